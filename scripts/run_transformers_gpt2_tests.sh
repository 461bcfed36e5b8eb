#!/usr/bin/env bash
# Run transformers' own GPT-2 model tests (tests/models/gpt2/test_modeling_gpt2.py with the common model, generation
# and pipeline mixins) against GPTMeg, and against GPT-2 itself for the baseline counts. Not part of the pytest suite.
#
#   scripts/run_transformers_gpt2_tests.sh TESTS_ROOT [gptmeg|gpt2|both] [extra pytest arguments...]
#
# TESTS_ROOT: a folder holding transformers' `tests/` for the INSTALLED transformers version (a checkout of its
# release tag, or the release sdist's tests/ completed with the files the sdist lacks: tests/models/gpt2/,
# tests/generation/, tests/exporters/, tests/pipelines/, tests/utils/, tests/causal_lm_tester.py; and the
# checkout's utils/test_module/, which tests/utils imports). Nothing is
# downloaded: the folder is copied to a scratch directory, the GPT-2 classes are swapped for GPTMeg's there
# (tests/models/gptmeg/test_modeling_gptmeg.py), and pytest runs on CPU with the Hub offline.
# The test utilities need `parameterized` (`accelerate` for one training test, `pytest-timeout` for --timeout); put
# them on EXTRA_PYTHONPATH if the environment lacks them: `pip install --target DIR parameterized accelerate ...`.
# Environment: PYTHON (default: the repository's .venv/bin/python), EXTRA_PYTHONPATH, KEEP_WORKDIR=1 keeps the scratch
# copy, OMP_NUM_THREADS (default 1).
set -euo pipefail

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[ $# -ge 1 ] || usage
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TESTS_ROOT=$(cd "$1" 2>/dev/null && pwd) || { echo "run_transformers_gpt2_tests: no folder $1" >&2; exit 2; }
WHICH=${2:-both}
shift $(( $# >= 2 ? 2 : 1 ))
case "$WHICH" in gptmeg|gpt2|both) ;; *) echo "run_transformers_gpt2_tests: choose gptmeg, gpt2 or both, not $WHICH" >&2; exit 2;; esac
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PYTHON" ] || { echo "run_transformers_gpt2_tests: no python at $PYTHON (set PYTHON)" >&2; exit 2; }
GPT2_TESTS=$TESTS_ROOT/tests/models/gpt2/test_modeling_gpt2.py
[ -f "$GPT2_TESTS" ] || { echo "run_transformers_gpt2_tests: $GPT2_TESTS is missing: TESTS_ROOT must hold transformers' tests/" >&2; exit 2; }

export PYTHONPATH="$ROOT${EXTRA_PYTHONPATH:+:$EXTRA_PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
"$PYTHON" -c "import parameterized" 2>/dev/null || {
    echo "run_transformers_gpt2_tests: transformers' test utilities need the 'parameterized' package; install it or" \
         "put it on EXTRA_PYTHONPATH" >&2; exit 2; }
TRANSFORMERS_DIR=$("$PYTHON" -c "import os, transformers; print(os.path.dirname(transformers.__file__))")
echo "transformers $("$PYTHON" -c 'import transformers; print(transformers.__version__)') at $TRANSFORMERS_DIR"

WORK=$(mktemp -d /tmp/hf-gpt2-tests.XXXXXX)
[ "${KEEP_WORKDIR:-0}" = 1 ] && echo "scratch copy: $WORK" || trap 'rm -rf "$WORK"' EXIT
cp -r "$TESTS_ROOT/tests" "$WORK/tests"
if [ -d "$TESTS_ROOT/utils/test_module" ]; then  # tests/utils/test_configuration_utils.py imports utils/test_module
    mkdir -p "$WORK/utils" && cp -r "$TESTS_ROOT/utils/test_module" "$WORK/utils/"
fi
mkdir -p "$WORK/src" && ln -s "$TRANSFORMERS_DIR" "$WORK/src/transformers"  # test_pipeline_mixin reads src/transformers

# The multi-process FSDP / tensor-parallel helpers are not in every release's sdist: a stand-in that skips them.
if [ ! -f "$WORK/tests/distributed_testing_utils.py" ]; then
    cat > "$WORK/tests/distributed_testing_utils.py" <<'EOF'
import unittest


def _skip(*args, **kwargs):
    raise unittest.SkipTest("multi-process distributed test helpers (tests/distributed_testing_utils.py) not provided")


_get_distributed_backend = _get_distributed_device_type = _get_rank_device = _set_rank_device = _skip
_start_rank_processes = run_distributed = _skip
EOF
fi

# transformers' own root conftest loads network and xdist plugins: a minimal one instead.
cat > "$WORK/conftest.py" <<'EOF'
import sys

import transformers.testing_utils as testing_utils

try:
    import httpx  # noqa: F401
except ImportError:  # the test utilities import httpx; huggingface_hub ships the one transformers uses
    from huggingface_hub.utils import httpx as _httpx

    sys.modules["httpx"] = _httpx

if not hasattr(testing_utils, "_TEXT_MODEL_TESTER_DEFAULTS"):  # tester defaults of releases whose tests want them
    testing_utils._TEXT_MODEL_TESTER_DEFAULTS = {
        "batch_size": 13, "seq_length": 7, "is_training": True, "use_input_mask": True, "use_labels": True,
        "vocab_size": 99, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 2, "intermediate_size": 32, "hidden_act": "gelu", "max_position_embeddings": 512,
        "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "expert_interval": 1, "moe_layer_start_index": 0,
        "moe_intermediate_size": 16, "shared_expert_intermediate_size": 36, "shared_expert_gate": True,
        "moe_num_shared_experts": 2, "num_experts_per_tok": 2, "num_experts": 8,
    }

try:
    import gptmeg  # noqa: F401  (registers GPTMeg with the Auto classes)
except ImportError:
    pass
else:
    # The tests tell base models, causal-LM heads, classifiers... apart by transformers' name tables, which an
    # out-of-tree model cannot enter by AutoModel*.register: GPTMeg's classes stand where GPT-2's do.
    from transformers.models.auto import modeling_auto

    for table_name in dir(modeling_auto):
        table = getattr(modeling_auto, table_name)
        if table_name.startswith("MODEL_") and table_name.endswith("_MAPPING_NAMES") and isinstance(table, dict) \
                and isinstance(table.get("gpt2"), str):
            table.setdefault("gptmeg", table["gpt2"].replace("GPT2", "GPTMeg"))


def pytest_configure(config):
    for mark in ("torch_compile_test", "torch_export_test", "generate", "flash_attn_test", "flash_attn_3_test",
                 "flash_attn_4_test", "all_flash_attn_test", "is_training_test", "is_tensor_parallel_test",
                 "is_fsdp_test", "is_expert_parallel_test", "bitsandbytes", "is_pipeline_test", "is_staging_test",
                 "accelerate_tests", "not_device_test", "kernels_test", "timeout"):
        config.addinivalue_line("markers", f"{mark}: transformers test marker")
EOF

# The swap: every GPT-2 class for GPTMeg's, imported from gptmeg; the tester names its classes (transformers infers
# them only for classes that live in transformers).
mkdir -p "$WORK/tests/models/gptmeg"
touch "$WORK/tests/models/gptmeg/__init__.py"
"$PYTHON" - "$GPT2_TESTS" "$WORK/tests/models/gptmeg/test_modeling_gptmeg.py" <<'EOF'
import re
import sys

source, target = sys.argv[1], sys.argv[2]
text = open(source).read()
classes = ["Config", "Model", "LMHeadModel", "DoubleHeadsModel", "ForQuestionAnswering", "ForSequenceClassification",
           "ForTokenClassification"]
for suffix in sorted(classes, key=len, reverse=True):
    text = re.sub(rf"\bGPT2{suffix}\b", f"GPTMeg{suffix}", text)
text = text.replace("GPT2ModelTester", "GPTMegModelTester").replace("GPT2ModelTest", "GPTMegModelTest")
# imports: the GPTMeg classes come from gptmeg, everything else still from transformers
text = re.sub(r"from transformers import GPTMegConfig, ", "from transformers import ", text, count=1)
block = re.search(r"\n    from transformers import \(\n(.*?)\n    \)\n", text, re.S)
if block is None:
    sys.exit("run_transformers_gpt2_tests: the GPT-2 test file's imports are not the expected ones; update the swap")
names = [n.strip().rstrip(",") for n in block.group(1).splitlines() if n.strip()]
ours = ["GPTMegConfig"] + [n for n in names if n.startswith("GPTMeg") and n != "GPTMegConfig"]
theirs = [n for n in names if not n.startswith("GPTMeg")]
imports = "\n    from gptmeg import " + ", ".join(ours) + "\n"
if theirs:
    imports += "    from transformers import " + ", ".join(theirs) + "\n"
text = text[: block.start()] + imports + text[block.end():]
tester = "        causal_lm_class = GPTMegLMHeadModel\n"
if tester not in text:
    sys.exit("run_transformers_gpt2_tests: the GPT-2 tester does not set causal_lm_class as expected; update the swap")
text = text.replace(tester, tester + "".join(
    f"        {attribute} = GPTMeg{suffix}\n"
    for attribute, suffix in [("config_class", "Config"), ("question_answering_class", "ForQuestionAnswering"),
                              ("sequence_classification_class", "ForSequenceClassification"),
                              ("token_classification_class", "ForTokenClassification")]
), 1)
# GPT-2 features GPTMeg refuses by design: the test must see the refusal (strict xfail), not pass or skip
refusals = {
    "test_cross_attention_respects_encoder_padding_mask": "GPTMeg has no cross-attention: encoder_hidden_states are "
    "refused with a ValueError",
}
for test, reason in refusals.items():
    text = text.replace(f"    def {test}(self", f"    @pytest.mark.xfail(raises=ValueError, strict=True, reason={reason!r})\n"
                        f"    def {test}(self", 1)
# One eager test uses `_supports_attention_backend` as its sign that a model builds masks with transformers' mask API
# (packed rows found from position_ids). GPTMeg does (create_causal_mask) but refuses attention backends (they would
# change the fp16 numerics), so the flag is lifted for that eager test alone.
anchor = "    model_tester_class = GPTMegModelTester\n"
if anchor not in text:
    sys.exit("run_transformers_gpt2_tests: GPTMegModelTest does not set model_tester_class as expected; update the swap")
text = text.replace(anchor, anchor + """
    def test_eager_padding_matches_padding_free_with_position_ids(self):
        from unittest import mock

        from gptmeg.modeling_gptmeg import GPTMegPreTrainedModel

        with mock.patch.object(GPTMegPreTrainedModel, "_supports_attention_backend", True):
            super().test_eager_padding_matches_padding_free_with_position_ids()
""", 1)
open(target, "w").write(text)
EOF

status=0
run() {
    echo "== $1: $2"
    (cd "$WORK" && "$PYTHON" -m pytest "$2" -q -p no:cacheprovider -rsfE "${@:3}") || status=1
}
if [ "$WHICH" != gptmeg ]; then run "GPT-2 (baseline)" tests/models/gpt2/test_modeling_gpt2.py "$@"; fi
if [ "$WHICH" != gpt2 ]; then run GPTMeg tests/models/gptmeg/test_modeling_gptmeg.py "$@"; fi
exit $status
