"""``python -m rtlm_adapt.cli ARGS`` is ``rtlm-adapt ARGS``."""

from rtlm_adapt.cli import main

raise SystemExit(main())
