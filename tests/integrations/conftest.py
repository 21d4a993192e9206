"""HF models in these tests are built from configs with random weights: nothing may be downloaded."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
