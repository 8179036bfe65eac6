"""Download a model from the Hugging Face Hub into models/ (for users who are online).

    python download_model.py                                     # Gemma 2 2B Instruct
    python download_model.py --REPO_ID=meta-llama/Llama-3.2-1B-Instruct --LOCAL_DIR=models/llama-3.2-1b-it

Gemma is a gated model: accept its licence on the model's page while logged in,
then `hf auth login` (or pass --TOKEN=hf_...).  Equivalent to
`hf download google/gemma-2-2b-it --local-dir models/gemma-2-2b-it`, plus a record of the
repository id (download_record.json), which export_lora.py writes into the PEFT adapter as
its base model.  A Hub id given as --MODEL_PATH to any script is downloaded the same way.
"""

from common.config import configure

# ---------------------------------------------------------------- constants
REPO_ID = "google/gemma-2-2b-it"  # model repository on the Hugging Face Hub
LOCAL_DIR = "models/gemma-2-2b-it"  # where the files go (the MODEL_PATH to use afterwards)
REVISION: str | None = None  # branch, tag or commit (None = main)
TOKEN: str | None = None  # access token (None = the one saved by `hf auth login`)

config = configure(globals())
# ---------------------------------------------------------------------------

from common.model import DOWNLOAD_RECORD, ModelNotFoundError, download_model  # noqa: E402

try:
    path = download_model(REPO_ID, LOCAL_DIR, REVISION, TOKEN)
except ModelNotFoundError as exc:
    raise SystemExit(f"error: {exc}") from None
print(f"downloaded {REPO_ID} to {path} (recorded in {DOWNLOAD_RECORD}); use it with --MODEL_PATH={LOCAL_DIR}")
