"""``python -m comfywatch`` runs the command line."""

from comfywatch.cli import main

raise SystemExit(main())
