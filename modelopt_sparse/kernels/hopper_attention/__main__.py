"""``python -m modelopt_sparse.kernels.hopper_attention {precompile,smoke,sass,bench}``: the
engine's developer tools (:mod:`.tools`; tools/device_hopper.sh runs them)."""

from .tools import _main

raise SystemExit(_main())
