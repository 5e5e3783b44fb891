"""Pipeline stages, one script each: `python -m stages.<name> [task]` (see dvc.yaml).

Library chatter is quieted here, before any stage imports transformers or datasets (both read
these variables at import time).
"""

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
