"""Greedy math accuracy of the base model alone, no LoRA: the baseline every run is compared with.

    python eval_math_base.py --MODEL_PATH=models/tiny-gemma2-math --EVAL_FILE=data/synth_test.jsonl
    python eval_math_base.py --QUANT=nf4 ...   # the base's linear layers in 4-bit NF4 (needs bitsandbytes)

Same constants (QUANT included) and output as eval_math.py (it runs that script), but
refuses a LoRA checkpoint, so a baseline number can never come from an adapted model.
"""

import runpy
import sys
from pathlib import Path

if any(arg.startswith("--LORA_CKPT") for arg in sys.argv[1:]):
    raise SystemExit("error: eval_math_base.py evaluates the base model only; "
                     "use eval_math.py --LORA_CKPT=... for a LoRA checkpoint")
runpy.run_path(str(Path(__file__).with_name("eval_math.py")), run_name="__main__")
