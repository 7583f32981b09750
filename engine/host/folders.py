"""Where a dashboard finds launch profiles and fine-tune specs by name, and where it puts the logs of the
servers and the folders of the jobs it starts.

The dashboard on a real host uses the user's own folders (every field None: the XDG defaults and
./configs). `fleetdeck demo` gives its own, under the demo's folder, so its start dialogs offer the
demo's profiles and specs and nothing it starts lands among the operator's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from engine.finetune.spec import spec_roots
from engine.vllm.profile import profile_roots


@dataclass(frozen=True)
class Folders:
    profiles: tuple[Path, ...] | None = None  # None: engine.vllm.profile.profile_roots()
    specs: tuple[Path, ...] | None = None  # None: engine.finetune.spec.spec_roots()
    server_logs: Path | None = None  # None: the state dir's servers/
    jobs: Path | None = None  # None: the state dir's jobs/

    def profile_roots(self) -> list[Path]:
        if self.profiles is not None:
            return list(self.profiles)
        return profile_roots()

    def spec_roots(self) -> list[Path]:
        if self.specs is not None:
            return list(self.specs)
        return spec_roots()
