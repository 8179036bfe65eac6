"""Download a model from the Hugging Face Hub into models/ (for users who are online).

    python download_model.py                                     # Gemma 2 2B Instruct
    python download_model.py --REPO_ID=meta-llama/Llama-3.2-1B-Instruct --LOCAL_DIR=models/llama-3.2-1b-it

Gemma is a gated model: accept its licence on the model's page while logged in,
then `hf auth login` (or pass --TOKEN=hf_...).  Equivalent to
`hf download google/gemma-2-2b-it --local-dir models/gemma-2-2b-it`.
"""

from common.config import configure

# ---------------------------------------------------------------- constants
REPO_ID = "google/gemma-2-2b-it"  # model repository on the Hugging Face Hub
LOCAL_DIR = "models/gemma-2-2b-it"  # where the files go (the MODEL_PATH to use afterwards)
REVISION: str | None = None  # branch, tag or commit (None = main)
TOKEN: str | None = None  # access token (None = the one saved by `hf auth login`)

config = configure(globals())
# ---------------------------------------------------------------------------

from huggingface_hub import snapshot_download  # noqa: E402
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError  # noqa: E402

# Weights as safetensors only: skip the duplicate .bin / .gguf copies some repositories carry.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]

try:
    path = snapshot_download(repo_id=REPO_ID, local_dir=LOCAL_DIR, revision=REVISION, token=TOKEN,
                             allow_patterns=ALLOW_PATTERNS)
except GatedRepoError:
    raise SystemExit(f"error: {REPO_ID} is gated: accept its licence at https://huggingface.co/{REPO_ID} "
                     "while logged in, then run `hf auth login` (or pass --TOKEN=...)") from None
except RepositoryNotFoundError:
    raise SystemExit(f"error: no model repository {REPO_ID!r} (or it is private and you are not logged in)") from None
print(f"downloaded {REPO_ID} to {path}; use it with --MODEL_PATH={LOCAL_DIR}")
