"""The static path as a GPU runs it, seen on the CPU: the decode graph reads the KV buffers without
repeating them (GQA), one KV allocation per slot bucket and at most two compilations over a GRPO run
with uneven chunks and evals, log-probs from the trainer's head in bf16, no host read but the stop
checks, and the same tokens and log-probs as the eager path on every architecture (their CUDA cases, marked cuda
by DEVICES, are what a `pytest -m cuda` run repeats on the GPU)."""

import functools
import inspect
import json
import sys
from types import SimpleNamespace

import pytest
import torch
import transformers
from torch._functorch.aot_autograd import aot_module_simplified
from torch.utils._python_dispatch import TorchDispatchMode

import common.rollout
import common.sampler
from common.logprobs import body_hidden_states, token_logprobs
from common.sampler import STOP_CHECK_EVERY, SamplingParams, even_chunk_rows, gqa_decode_attention, left_pad, sample
from tests.conftest import (DEVICES, MICRO_ARCHITECTURES, REPO_ROOT, TINY_MODEL_DIR, micro_arch_model, run_script,
                            sample_with)

PROMPTS = [[2, 5, 9, 11, 4], [2, 7, 3], [2, 13, 6, 8]]
PAD = 0
GQA_ARCHITECTURES = ("gemma2", "llama", "qwen2", "qwen3", "mistral")


def grouped_model(arch: str, device: str = "cpu"):
    """A micro model with 4 query heads sharing 2 KV heads (a group of 2)."""
    return micro_arch_model(arch, num_attention_heads=4, num_key_value_heads=2).to(device)


def stop_token_of(model, device="cpu") -> int:
    """A token row 0 emits third when nothing stops it: as a stop token it ends some rows early."""
    free_run = sample_with(model, PROMPTS, num_samples=2, max_new_tokens=12, temperature=0.0, eos_token_ids=[-1],
                           pad_token_id=PAD, sampler="eager")
    return int(free_run.completion_ids[0, 2])


def test_even_chunk_rows_hand_worked():
    assert even_chunk_rows(128, 80) == 64  # 2 chunks of 64, not 80 + 48
    assert even_chunk_rows(130, 80) == 65
    assert even_chunk_rows(127, 64) == 64  # 64 + 63, padded to 64
    assert even_chunk_rows(6, 4) == 3
    assert even_chunk_rows(6, 0) == 6 and even_chunk_rows(6, 10) == 6


def test_sampling_params_is_one_checked_frozen_value():
    settings = SamplingParams(4, 32, 0.7, 0.9, 5, chunk_rows=8, sampler="static")
    with pytest.raises(Exception):
        settings.temperature = 1.0
    greedy = settings.greedy()
    assert (greedy.num_samples, greedy.temperature, greedy.top_p, greedy.top_k) == (1, 0.0, 1.0, 0)
    assert (greedy.max_new_tokens, greedy.chunk_rows, greedy.sampler) == (32, 8, "static")
    for bad in (dict(sampler="fast"), dict(temperature=-1.0), dict(num_samples=0), dict(chunk_rows=-1)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_no_sampler_function_takes_more_than_six_parameters():
    # gqa_decode_attention's signature is transformers' attention interface.
    functions = [value for name, value in vars(common.sampler).items() if inspect.isfunction(value)
                 and value.__module__ == "common.sampler" and name != "gqa_decode_attention"]
    functions.append(common.rollout.sample_rollouts)
    assert len(functions) > 15
    too_many = {f.__name__: len(inspect.signature(inspect.unwrap(f)).parameters) for f in functions
                if len(inspect.signature(inspect.unwrap(f)).parameters) > 6}
    assert not too_many


@pytest.mark.parametrize("softcap", [None, 50.0])
def test_gqa_decode_attention_equals_eager_attention(softcap):
    """Against Gemma 2's eager attention (repeat_kv, then the same soft-cap, mask and fp32 softmax), for a
    one-token query (the grouped path) and for a prefill (the fallback)."""
    from transformers.models.gemma2 import modeling_gemma2

    module = modeling_gemma2.Gemma2Attention(transformers.Gemma2Config(
        hidden_size=48, num_attention_heads=6, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8), 0)
    module.eval()
    generator = torch.Generator().manual_seed(0)
    for query_length in (1, 3):
        query = torch.randn(3, 6, query_length, 8, generator=generator)
        key, value = torch.randn(2, 3, 2, 11, 8, generator=generator)
        mask = torch.zeros(3, 1, query_length, 11)
        mask[0, ..., :4] = torch.finfo(torch.float32).min  # a left-padded row
        ours = gqa_decode_attention(module, query, key, value, mask, scaling=0.3, softcap=softcap)
        eager = modeling_gemma2.eager_attention_forward(module, query, key, value, mask, scaling=0.3, softcap=softcap)
        torch.testing.assert_close(ours[0], eager[0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(ours[1], eager[1], atol=1e-6, rtol=1e-6)


def traced_decode_graphs(model, monkeypatch, attention_switch: bool = True):
    """The aot (aten-level) graphs of the decode step the compiled path traces for ``model``."""
    graphs = []

    def backend(graph_module, example_inputs):
        def keep(graph, inputs):
            graphs.append(graph)
            return graph.forward

        from functorch.compile import make_boxed_func
        return aot_module_simplified(graph_module, example_inputs, fw_compiler=lambda g, i: make_boxed_func(keep(g, i)))

    torch._dynamo.reset()
    monkeypatch.setattr(common.sampler, "_compiled_decode_step",
                        functools.cache(lambda cuda_graphs: torch.compile(common.sampler._decode_step,
                                                                          backend=backend, fullgraph=True)))
    if not attention_switch:
        monkeypatch.setattr(common.sampler, "GQA_DECODE_MODEL_TYPES", frozenset())
    sample_with(model, PROMPTS, num_samples=2, max_new_tokens=4, temperature=0.0, eos_token_ids=[-1],
                pad_token_id=PAD, sampler="compiled")
    torch._dynamo.reset()
    return graphs


def repeated_kv_nodes(graphs, model) -> list[str]:
    """Nodes holding K or V repeated to every query head: [rows, kv, group, slots, D] (repeat_kv's
    expand) or [rows, heads, slots, D] with slots > 1 (its copy)."""
    config = model.config
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    found = []
    for graph in graphs:
        for node in graph.graph.nodes:
            value = node.meta.get("val")
            if not isinstance(value, torch.Tensor):
                continue
            shape = [str(size) for size in value.shape]
            if (len(shape) == 5 and shape[1:3] == [str(kv_heads), str(heads // kv_heads)]
                    and shape[4] == str(head_dim)) or (
                    len(shape) == 4 and shape[1] == str(heads) and shape[3] == str(head_dim) and shape[2] != "1"):
                found.append(f"{node.target}: {shape}")
    return found


@pytest.mark.parametrize("arch", GQA_ARCHITECTURES)
def test_decode_graph_holds_no_copy_of_the_repeated_kv_buffers(arch, monkeypatch):
    model = grouped_model(arch)
    graphs = traced_decode_graphs(model, monkeypatch)
    assert graphs and not repeated_kv_nodes(graphs, model)


@pytest.mark.parametrize("arch, attention", [("gemma2", "eager"), ("llama", "sdpa")])
def test_the_models_own_decode_attention_repeats_the_kv_buffers(arch, attention, monkeypatch):
    """What the test above looks for is there without GQA_DECODE: eager attention's repeat_kv, and
    sdpa's, which transformers skips for a one-token query only when not compiling."""
    model = grouped_model(arch)
    model.set_attn_implementation(attention)
    assert repeated_kv_nodes(traced_decode_graphs(model, monkeypatch, attention_switch=False), model)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", MICRO_ARCHITECTURES)
def test_static_path_gives_the_eager_tokens_and_logprobs_in_fp32_on_every_architecture(arch, device):
    model = micro_arch_model(arch, num_attention_heads=4, num_key_value_heads=2).to(device)
    settings = dict(num_samples=3, max_new_tokens=12, temperature=0.9, top_k=20, pad_token_id=PAD,
                    chunk_rows=4)  # 9 rows: chunks of 4, 4 and 1 padded to 4
    free_run = sample_with(model, PROMPTS, sampler="eager", generator=torch.Generator(device).manual_seed(3),
                           eos_token_ids=[-1], **settings)
    settings["eos_token_ids"] = [int(free_run.completion_ids[0, 2])]  # row 0 stops by its third token
    eager = sample_with(model, PROMPTS, sampler="eager", generator=torch.Generator(device).manual_seed(3), **settings)
    static = sample_with(model, PROMPTS, sampler="static", generator=torch.Generator(device).manual_seed(3),
                         **settings)
    assert torch.equal(static.completion_ids, eager.completion_ids)
    assert torch.equal(static.completion_mask, eager.completion_mask)
    assert torch.equal(static.truncated, eager.truncated)
    torch.testing.assert_close(static.logprobs, eager.logprobs, atol=1e-5, rtol=0)
    assert eager.completion_lengths.min() < eager.completion_lengths.max()


def bf16_body_tolerance(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> float:
    """How far two bf16 evaluations of the same body may put a token's log-prob apart when their kernels
    round differently, as a GPU's may for the sampler's shapes (a decode step: a few rows; a prefill) and
    the trainer's (whole sequences): another reduction order in fp32 flips a bf16 rounding here and there,
    a split-K kernel that adds its partial sums in bf16 (torch's default allows it) rounds them all anew.
    bf16 keeps 8 significant bits, so one rounding of the body's output h moves h_i by up to 2^-8 |h_i|,
    a logit z_j = W_j . h by up to 2^-8 sum_i |W_ji h_i| (H terms; the soft-cap's slope is at most 1),
    and log p(x) = z_x - logsumexp(z) by up to twice the largest of those over the V logits (the target's
    own, and the log-sum-exp's, which moves by at most its largest logit's move). The residual stream is
    rounded again at each of the L layers' adds: counted L + 1 times. Measured on the CPU, the sampler's
    linear layers' sums split in two and added in bf16 (a split-K kernel), and the bf16 body against the
    fp32 one (roundings all independent): the largest gap was 1.9 and 2.6 times one rounding's (the tiny
    model, V 1024, H 128, L = 4: one rounding 0.13 nats, the tolerance 0.66), 1.05 and 0.72 (a micro
    Gemma 2, V 64, H 16, L = 2; the tolerance 1.0e-2); another fp32 order alone, 0.01 and 0.07 times."""
    with torch.no_grad():
        predicting = (attention_mask[:, :-1] * attention_mask[:, 1:]).bool()  # real positions before a real token
        hidden = body_hidden_states(model, input_ids, attention_mask)[:, :-1][predicting]
        weight = model.get_output_embeddings().weight
        one_rounding = 2 * 2.0 ** -8 * (hidden.abs().float() @ weight.abs().float().T).amax()
    return float((model.config.num_hidden_layers + 1) * one_rounding)


# On the CPU the two shapes' bf16 bodies come out bit-identical here (the same kernels round the same
# sums): the gap is the fp32 head's own reduction order, an fp32 ulp at the logits' 16-32 (measured
# 1.8e-6 over 301 tokens, eager and static), and 1e-3 stays below what sampling from the model's bf16
# logits gives (up to 5.7e-2), the mistake this test is for. A GPU's kernels round the shapes apart:
# bf16_body_tolerance (0.66 nats for the tiny model), which a split-K kernel reducing in bf16 can
# approach (emulated on the CPU, the test below: 0.25), while another fp32 order alone gave 7.5e-4: 1e-3
# would be tight.
CPU_GAP_TOLERANCE = 1e-3


def bf16_sampler_trainer_gaps(sampler: str, device: str, sampler_linear=None):
    """|sampler's log-prob - trainer's| of each completion token of the tiny model in bf16 (4 questions x 4
    samples of up to 40 tokens at T = 1), with the model, its inputs and attention mask; ``sampler_linear``:
    the sampler's F.linear in place of torch's (a kernel that rounds otherwise)."""
    from common.data import load_problems
    from common.model import load_model_and_tokenizer, stop_token_ids
    from common.prompts import encode_prompts

    model, tokenizer, _ = load_model_and_tokenizer(TINY_MODEL_DIR, device, "bfloat16")
    questions = [problem["question"] for problem in load_problems("data/synth_test.jsonl", limit=4)]
    linear = torch.nn.functional.linear
    torch.nn.functional.linear = sampler_linear or linear
    try:
        out = sample(model, encode_prompts(tokenizer, questions),
                     SamplingParams(4, 40, temperature=1.0, sampler=sampler,
                                    generator=torch.Generator(device).manual_seed(0)),
                     tokenizer=tokenizer, eos_token_ids=stop_token_ids(model, tokenizer))
    finally:
        torch.nn.functional.linear = linear
    lengths = out.completion_lengths.tolist()
    rows = [prompt + ids[:n].tolist() for prompt, ids, n in zip(out.prompt_ids, out.completion_ids.cpu(), lengths)]
    input_ids, attention_mask = left_pad(rows, tokenizer.pad_token_id, torch.device(device))
    with torch.no_grad():
        trainer = token_logprobs(model, input_ids, attention_mask, temperature=1.0)
    gaps = torch.cat([(trainer[row, trainer.size(1) - n:] - out.logprobs[row, :n]).abs().cpu()
                      for row, n in enumerate(lengths)])
    return gaps, model, input_ids, attention_mask


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sampler", ["eager", "static"])
def test_bf16_sampler_logprobs_are_the_trainers(sampler, device, record_property):
    """In bf16 the sampler draws from the trainer's fp32-output head (soft-capped once in fp32): its
    log-probs are the trainer's recomputation's up to the body's rounding (CPU_GAP_TOLERANCE on the
    CPU, bf16_body_tolerance on a GPU). The largest gap is recorded beside its tolerance: a row of
    bench/gpu_check.py's table, so that the first card's run measures it."""
    gaps, model, input_ids, attention_mask = bf16_sampler_trainer_gaps(sampler, device)
    tolerance = CPU_GAP_TOLERANCE if device == "cpu" else bf16_body_tolerance(model, input_ids, attention_mask)
    measured = f"{gaps.max():.2e} nats over {gaps.numel()} tokens, tolerance {tolerance:.2e}"
    record_property("largest bf16 sampler-trainer log-prob gap", measured)
    assert gaps.numel() > 100 and gaps.max() < tolerance, measured


def split_k(linear):
    """``linear`` (F.linear) as a split-K kernel that reduces in bf16 computes it for bf16 inputs: the two
    halves of each sum, each rounded to bf16, added in bf16."""
    def split(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.dtype != torch.bfloat16:
            return linear(x, weight, bias)
        half = x.size(-1) // 2
        y = linear(x[..., :half], weight[:, :half]) + linear(x[..., half:], weight[:, half:])
        return y if bias is None else y + bias
    return split


def test_a_sampler_that_rounds_as_a_split_k_kernel_stays_within_the_gpu_tolerance():
    """bf16_body_tolerance checked on the CPU: the sampler's linear layers (and none of the trainer's)
    round their sums as a GPU's split-K kernel may; the gaps leave CPU_GAP_TOLERANCE far behind (the
    CPU's bit-identical bodies are gone) and stay within the GPU's tolerance."""
    gaps, model, input_ids, attention_mask = bf16_sampler_trainer_gaps("static", "cpu",
                                                                       split_k(torch.nn.functional.linear))
    assert gaps.numel() > 100 and gaps.max() > 10 * CPU_GAP_TOLERANCE
    assert gaps.max() < bf16_body_tolerance(model, input_ids, attention_mask)


class ScalarReads(TorchDispatchMode):
    """Counts the host reads of device values: item / bool / int (aten._local_scalar_dense), and the
    tolist calls (counted by the test's wrapper: on the CPU they do not dispatch)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_static_sampler_reads_the_host_once_per_stop_check_plus_two_per_call(monkeypatch):
    from common.model import load_tokenizer

    tokenizer = load_tokenizer(TINY_MODEL_DIR)
    model = grouped_model("llama")
    model.resize_token_embeddings(len(tokenizer))
    reads = ScalarReads()
    tolist = torch.Tensor.tolist

    def counted_tolist(tensor):
        reads.count += 1
        return tolist(tensor)

    monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
    max_new_tokens, rows = 3 * STOP_CHECK_EVERY, 12
    settings = SamplingParams(4, max_new_tokens, temperature=1.0, chunk_rows=8, sampler="static",
                              generator=torch.Generator().manual_seed(0))
    with reads:  # no row stops (the stop token is never drawn): every stop check runs
        out = sample(model, PROMPTS, settings, tokenizer=tokenizer, eos_token_ids=[len(tokenizer) + 5])
    assert len(out.texts) == rows and out.truncated.all()
    chunks = 2
    assert reads.count <= chunks * (max_new_tokens // STOP_CHECK_EVERY) + 2 * chunks


LAUNCHER = '''
import atexit, functools, json, runpy, sys
sys.path.insert(0, ".")  # run from the repository root
import torch
import common.sampler as sampler

counts = {"compiles": 0, "allocations": 0, "slots": [], "rows": []}

def counting_backend(graph_module, example_inputs):
    counts["compiles"] += 1
    return graph_module.forward

sampler._compiled_decode_step = functools.cache(
    lambda cuda_graphs: torch.compile(sampler._decode_step, backend=counting_backend, fullgraph=True))
allocate = sampler._KVStorage.__init__
def counted_allocation(self, *args):
    counts["allocations"] += 1
    allocate(self, *args)
sampler._KVStorage.__init__ = counted_allocation
static_kv_cache = sampler._static_kv_cache
def seen(model, prefilled, width, slots):
    counts["slots"].append(slots)
    counts["rows"].append(prefilled.layers[0].keys.size(0))
    return static_kv_cache(model, prefilled, width, slots)
sampler._static_kv_cache = seen
atexit.register(lambda: print("COUNTS " + json.dumps(counts)))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def test_grpo_run_allocates_once_per_slot_bucket_and_compiles_at_most_twice(micro_model_dir, tmp_path):
    """20 steps of 2 questions x 3 samples, sampled 4 rows at a time (equal chunks of 3), some of the
    questions long enough for a second prompt bucket, with 3 evals of 5 questions 3 at a time (the last
    batch padded): the compiled path, with a counting backend and a spy on the KV allocations."""
    lines = (REPO_ROOT / "data" / "synth_train.jsonl").read_text().splitlines()[:34]
    long_question = "What is " + " + ".join(["1"] * 35) + "?"  # about 90 tokens: the 128 bucket
    for position in (3, 11, 17, 25, 30, 38):
        lines.insert(position, json.dumps({"question": long_question, "gold_answer": "35"}))
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("\n".join(lines) + "\n")
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    result = run_script([str(launcher), "run_train_grpo.py", f"--MODEL_PATH={micro_model_dir}",
                         f"--TRAIN_FILE={train_file}", "--EVAL_FILE=data/synth_test.jsonl",
                         "--PROMPTS_PER_STEP=2", "--NUM_SAMPLES_PER_PROMPT=3",
                         "--GENERATION_BATCH_SIZE=4", "--MAX_NEW_TOKENS=6", "--MAX_STEPS=20", "--EVAL_EVERY=10",
                         "--EVAL_LIMIT=5", "--EVAL_BATCH_SIZE=3", "--SAMPLER=compiled", "--DEVICE=cpu",
                         "--MICRO_BATCH_SIZE=6", f"--CHECKPOINT_DIR={tmp_path}", f"--LOG_DIR={tmp_path}",
                         "--RUN_NAME=counted", "--SAMPLE_EVERY=0"])
    counts = json.loads(result.stdout.split("COUNTS ")[-1])
    assert "step 20/20" in result.stdout
    assert len(counts["slots"]) == 20 * 2 + 3 * 2  # every step's two chunks and every eval's two batches
    assert set(counts["rows"]) == {3}  # one row count: the chunks and the eval batches padded alike
    assert sorted(set(counts["slots"])) == [80, 128]  # two slot buckets, met in turn
    assert counts["allocations"] <= 2
    assert 1 <= counts["compiles"] <= 2


def test_evaluate_takes_greedy_settings_and_pads_its_last_batch_alike(micro_model_dir):
    from common.data import load_problems
    from common.evaluate import evaluate
    from common.model import load_model_and_tokenizer

    model, tokenizer, _ = load_model_and_tokenizer(micro_model_dir, "cpu")
    problems = load_problems("data/synth_test.jsonl", limit=5)
    records = {}
    for sampler in ("eager", "static"):  # batches of 2, 2 and 1 (padded to 2 on the static path)
        greedy = SamplingParams(max_new_tokens=5, temperature=0.0, chunk_rows=2, sampler=sampler)
        records[sampler] = evaluate(model, tokenizer, problems, greedy, progress=False).records
    assert records["static"] == records["eager"] and len(records["eager"]) == 5
    with pytest.raises(ValueError, match="greedily"):
        evaluate(model, tokenizer, problems, SamplingParams(max_new_tokens=5), progress=False)


@pytest.mark.parametrize("triton_package", [False, True])
def test_auto_takes_the_static_path_uncompiled_on_cuda_without_triton(triton_package, monkeypatch, capsys):
    """Without Triton for the card: not installed (Windows), or installed and the card below compute
    capability 7.0, where torch's has_triton() says no though the package is there (issue 29, finding 5).
    `compiled` is then refused in one line."""
    import importlib.machinery
    import importlib.util

    import torch.utils._triton

    from common.sampler import _auto_path, _compiler_has_gpu_backend, _sample_rows

    find_spec = importlib.util.find_spec
    triton_spec = importlib.machinery.ModuleSpec("triton", None) if triton_package else None
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: triton_spec if name == "triton"
                        else find_spec(name, *args))
    monkeypatch.setattr(torch.utils._triton, "has_triton_package", lambda: triton_package)
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: False)
    _compiler_has_gpu_backend.cache_clear()
    try:
        assert [_auto_path(torch.device("cuda")) for _ in range(2)] == ["static", "static"]
        assert capsys.readouterr().out.count("no Triton") == 1  # said once
        assert _auto_path(torch.device("cpu")) == "eager"
        on_cuda = SimpleNamespace(parameters=lambda: iter([SimpleNamespace(device=torch.device("cuda"))]))
        with pytest.raises(ValueError, match="sampler='compiled' needs Triton .*; use sampler='static'"):
            _sample_rows(on_cuda, PROMPTS, SamplingParams(1, 2, sampler="compiled"), [1], PAD)
    finally:
        _compiler_has_gpu_backend.cache_clear()


@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_the_compiled_path_without_cuda_graphs_compiles_in_a_mode_without_them(cuda_graphs, monkeypatch):
    """A run whose plan frees the static KV before each policy pass samples with cuda_graphs=False: its
    buffers come back at a new address every step, which CUDA graphs would record again every step (issue
    29, finding 9); the decode step is then compiled in the default mode, without CUDA graphs. torch.compile
    is replaced by one that records the mode it is asked for and runs the step as it is."""
    import common.sampler

    modes = []

    def recording_compile(function, mode=None, **options):
        modes.append(mode)
        return function

    monkeypatch.setattr(torch, "compile", recording_compile)
    common.sampler._compiled_decode_step.cache_clear()
    try:
        settings = SamplingParams(2, 4, temperature=0.0, sampler="compiled", cuda_graphs=cuda_graphs)
        out = sample(grouped_model("gemma2"), PROMPTS, settings, eos_token_ids=[-1], pad_token_id=PAD)
    finally:
        common.sampler._compiled_decode_step.cache_clear()
    assert out.completion_ids.shape == (2 * len(PROMPTS), 4)
    assert modes == ["reduce-overhead" if cuda_graphs else "default"]
