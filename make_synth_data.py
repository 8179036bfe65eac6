"""Write the synthetic arithmetic word-problem splits used with the tiny model.

    python make_synth_data.py --OVERWRITE=true      # data/synth_{train,test,dev}.jsonl (they ship with the repo)
    python make_synth_data.py --TRAIN_SIZE=100 --OUT_DIR=/tmp/synth

The test split is drawn first and the train split excludes every normalised
test question, so a score on the test split never rewards memorising training
questions.  The dev split (for choices such as model_soup.py's greedy recipe)
excludes both, so choosing on it neither peeks at the test split nor rewards
memorising training questions.  Each line is {"question", "gold_answer", "solution"}.
"""

from pathlib import Path

from common.config import configure
from common.data import write_jsonl
from common.run import check_output
from common.synth import make_problems, normalise_question

TRAIN_SIZE = 4000  # problems in the train split
TEST_SIZE = 500  # problems in the test split, disjoint from train by normalised question
DEV_SIZE = 500  # problems in the dev split, disjoint from train and test by normalised question
SEED = 0  # random seed; the test split uses SEED, the train split SEED + 1, the dev split SEED + 2
OUT_DIR = "data"  # directory that receives synth_train.jsonl, synth_test.jsonl and synth_dev.jsonl
OVERWRITE = False  # replace existing outputs (else an existing one is refused, before any work)

config = configure(globals())

FIELDS = ("question", "gold_answer", "solution")
SPLITS = ("test", "train", "dev")
paths = {split: Path(OUT_DIR) / f"synth_{split}.jsonl" for split in SPLITS}
for path in paths.values():  # before any work: all three, or none
    check_output(path, "OUT_DIR", OVERWRITE)

test = make_problems(TEST_SIZE, seed=SEED)
train = make_problems(TRAIN_SIZE, seed=SEED + 1,
                      exclude={normalise_question(p["question"]) for p in test})
# Drawn last, so that adding it left the train and test splits unchanged.
dev = make_problems(DEV_SIZE, seed=SEED + 2,
                    exclude={normalise_question(p["question"]) for p in test + train})
for split, problems in zip(SPLITS, (test, train, dev)):
    write_jsonl(paths[split], [{field: p[field] for field in FIELDS} for p in problems])
    print(f"wrote {len(problems)} problems to {paths[split]}")
