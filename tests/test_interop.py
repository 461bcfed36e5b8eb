"""Export folders run, unchanged, in tools users already have: onnxruntime-genai through the written
genai_config.json, transformers' AutoTokenizer through a tokenizer class every tool knows."""

from __future__ import annotations

import json

import pytest

from engines import GenerationSettings, generate, make_runtime, open_export
from export.genai_config import GENAI_CONFIG

PROMPTS = ["Once upon a time", "Hello world", "The quick brown fox jumps"]


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_onnxruntime_genai_runs_the_folder_as_written(tiny_exports, dtype):
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed here")
    folder = tiny_exports(dtype).folder
    manifest = json.loads((folder / "manifest.json").read_text())
    assert GENAI_CONFIG in manifest["files"]  # hashed like every other file of the export
    model = og.Model(str(folder))
    tokenizer = og.Tokenizer(model)
    artifact = open_export(folder)
    runtime = make_runtime(artifact)
    for prompt in PROMPTS:
        ids = [int(t) for t in tokenizer.encode(prompt)]
        assert ids == artifact.tokenizer.encode(prompt).ids  # genai's tokenizer reads ours identically
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + 40)
        generator = og.Generator(model, params)
        generator.append_tokens(ids)
        theirs = []
        while not generator.is_done():
            generator.generate_next_token()
            theirs.append(int(generator.get_next_tokens()[0]))
        ours = generate(runtime, [ids], GenerationSettings(max_new_tokens=40)).tokens[0]
        assert theirs == ours, prompt


def test_tokenizer_config_names_a_class_every_tool_knows(tiny_exports):
    from transformers import AutoTokenizer

    folder = tiny_exports("fp16").folder
    assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == "GPT2TokenizerFast"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for prompt in PROMPTS + ["¿Dónde está? 图书馆 😀"]:
        assert tokenizer.encode(prompt) == open_export(folder).tokenizer.encode(prompt).ids
