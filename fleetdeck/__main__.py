from fleetdeck.cli import main

raise SystemExit(main())
