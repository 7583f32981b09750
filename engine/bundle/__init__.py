"""The offline bundle (build.py), its own install step (install_script.py, copied into every bundle), the
wheels it is made of (wheels.py) and the push of a bundle to a node over SSH (push.py)."""
