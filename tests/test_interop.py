"""The runtime in the stacks around it: Hugging Face (keyword inputs, pipelines), torch.compile (one
graph per exit, compiled stages, saved policies across compilation) and ONNX export."""

import copy
import dataclasses
import pickle

import pytest
import torch
import torch._dynamo
from torch import nn

from eenet_fast import EarlyExitModel, ExitOutputs, ExitResult, make_policy, pooled_linear_head, wrap
from eenet_fast.decision import decide_reference

D, C = 16, 4


def tanh_mlp(exits=3, seed=0) -> EarlyExitModel:
    torch.manual_seed(seed)
    stages = [nn.Sequential(nn.Linear(D, D), nn.Tanh()) for _ in range(exits)]
    return EarlyExitModel(stages, [nn.Linear(D, C) for _ in range(exits)], backend="auto").eval()


def calibrated(model, x, name="eenet", seed=0):
    """``model`` with ``name`` fitted on its own outputs for ``x`` and random labels (thresholds that use every exit)."""
    logits = torch.stack(model.all_exits(x))
    labels = torch.randint(logits.shape[-1], (logits.shape[1],), generator=torch.Generator().manual_seed(seed))
    options = {"epochs": 2, "progress": False, "seed": seed} if name == "eenet" else {}
    k = model.num_exits
    model.policy = make_policy(name, **options).fit(ExitOutputs(logits, labels, list(range(1, k + 1))), (k + 1) / 2)
    return model


def assert_same_result(got: ExitResult, expected: ExitResult):
    assert torch.equal(got.exits, expected.exits)
    assert torch.equal(got.predictions, expected.predictions)
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-6)


X = torch.randn(96, D, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------ ExitResult and inputs
def test_exit_result_reads_as_a_read_only_dict_and_survives_pickle_and_copy():
    model = calibrated(tanh_mlp(), X)
    out = model(X[:10])
    assert isinstance(out, dict) and list(out) == ["logits", "predictions", "exits", "nonfinite"]
    assert out["logits"] is out.logits and out["exits"] is out.exits
    with pytest.raises(TypeError, match="read-only"):
        out["logits"] = out.logits * 2
    with pytest.raises(TypeError, match="read-only"):
        out.update(exits=out.exits)
    for twin in (pickle.loads(pickle.dumps(out)), copy.deepcopy(out), dataclasses.replace(out)):
        assert type(twin) is ExitResult and torch.equal(twin["exits"], out.exits)
        assert_same_result(twin, out)


def test_the_batch_is_one_argument_or_keywords_not_both():
    model = calibrated(tanh_mlp(), X)
    assert_same_result(model(x=X[:5]), model(X[:5]))
    with pytest.raises(TypeError, match="not both"):
        model(X[:5], input_ids=X[:5])
    with pytest.raises(TypeError, match="no input"):
        model()


# ------------------------------------------------------------------------------- torch.compile
def test_compiled_model_has_one_graph_per_exit_with_its_stage_inside_and_gives_the_same_result():
    model = calibrated(tanh_mlp(exits=3), X)
    graphs = []

    def record(graph, example_inputs):  # a torch.compile backend that keeps each graph's ops and runs it as is
        graphs.append([node.target for node in graph.graph.nodes if node.op == "call_function"])
        return graph.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=record)
    assert_same_result(compiled(X), model(X))
    assert int(model(X).exits.max()) == 2, "the policy should send samples to every exit"
    assert len(graphs) == 3, "one graph per exit: the compaction between exits is the one graph break"
    assert all(ops.count(torch.tanh) == 1 for ops in graphs), "each exit's stage is inside its graph"


@pytest.mark.slow
def test_compiled_model_gives_the_same_result_at_any_batch_size():
    model = calibrated(tanh_mlp(exits=3), X, name="entropy")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")  # functionalised: the writes into the outputs are checked too
    for batch in (96, 33, 2, 1, 0):
        assert_same_result(compiled(X[:batch]), model(X[:batch]))


def test_compile_stages_compiles_every_stage_and_head_and_gives_the_same_result():
    model = calibrated(tanh_mlp(), X)
    expected = [model(X[:batch]) for batch in (96, 7, 1)]
    torch._dynamo.reset()
    assert model.compile_stages(backend="eager") is model
    assert all(isinstance(m, torch._dynamo.eval_frame.OptimizedModule) for m in (*model.stages, *model.heads))
    for batch, result in zip((96, 7, 1), expected):
        assert_same_result(model(X[:batch]), result)


def test_saved_policies_load_across_torch_compile(tmp_path):
    """Calibrate, save, compile: the file loads into the compiled model (whose parameter names
    gain ``_orig_mod.``), and a file saved from a compiled model loads into a plain one."""
    net = nn.Sequential(*(nn.Sequential(nn.Linear(D, D), nn.Tanh()) for _ in range(3))).eval()
    model = calibrated(wrap(net, exits_after=[0, 1, 2], heads=pooled_linear_head(C), example_input=X[:2]), X)
    assert model.new_heads == (0, 1, 2)  # built by the factory: their weights travel with the policy
    expected = model(X)
    model.save_policy(tmp_path / "plain.safetensors")
    torch._dynamo.reset()
    model.compile_stages(backend="eager")
    assert any("_orig_mod." in name for name in model.state_dict())
    model.policy = None
    model.load_policy(tmp_path / "plain.safetensors")
    assert_same_result(model(X), expected)
    model.save_policy(tmp_path / "compiled.safetensors")
    fresh = wrap(net, exits_after=[0, 1, 2], heads=pooled_linear_head(C), example_input=X[:2])  # new random heads
    fresh.load_policy(tmp_path / "compiled.safetensors")  # restores the saved heads' weights
    assert_same_result(fresh(X), expected)


# --------------------------------------------------------------------------------- ONNX export
@pytest.mark.slow
def test_exported_exits_and_decision_reproduce_adaptive_inference_in_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="needs onnxruntime: pip install -e '.[export]'")
    pytest.importorskip("onnxscript", reason="needs onnxscript (torch.onnx's exporter): pip install -e '.[export]'")
    from eenet_fast.interop import export_onnx, load_decision

    model = calibrated(tanh_mlp(exits=3), X)
    paths = export_onnx(model, X[:8], tmp_path)
    assert [p.name for p in paths] == ["exit_0.onnx", "exit_1.onnx", "exit_2.onnx", "decision.safetensors"]
    sessions = [ort.InferenceSession(str(p)) for p in paths[:-1]]
    thresholds, heads = load_decision(paths[-1])

    # adaptive inference from the exported files alone: run the rows still running, compact
    state, ids, scores = X.numpy(), torch.arange(len(X)), torch.empty(len(X), 0)
    exits, logits_out = torch.full((len(X),), -1), torch.empty(len(X), C)
    for k, session in enumerate(sessions):
        next_state, logits = session.run(None, {"state": state})
        last = k == len(sessions) - 1
        decision = decide_reference(torch.from_numpy(logits), heads[k], scores, thresholds[k], last)
        exits[ids[decision.leave]] = k
        logits_out[ids[decision.leave]] = torch.from_numpy(logits)[decision.leave]
        keep = ~decision.leave
        state, ids = next_state[keep.numpy()], ids[keep]
        scores = torch.cat([scores, decision.score[:, None]], 1)[keep]
    expected = model(X)
    assert torch.equal(exits, expected.exits)
    torch.testing.assert_close(logits_out, expected.logits, rtol=1e-4, atol=1e-5)


def test_export_refuses_a_policy_without_score_heads(tmp_path):
    from eenet_fast.interop import export_onnx

    model = calibrated(tanh_mlp(), X, name="patience")
    with pytest.raises(ValueError, match="score heads"):
        export_onnx(model, X[:8], tmp_path)


# ------------------------------------------------------------------------------ Hugging Face
WORDS = "the a movie film plot was is very not good bad great dull fun boring".split()


def tiny_bert_and_tokenizer(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizerFast(str(tmp_path / "vocab.txt"))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32, num_labels=3, id2label={0: "negative", 1: "neutral", 2: "positive"},
    )  # fmt: skip
    return BertForSequenceClassification(config).eval(), tokenizer


def sentences(n, seed=0):
    """``n`` random sentences of 2 to 8 words."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 9, (n,), generator=g).tolist()
    return [" ".join(WORDS[i] for i in torch.randint(len(WORDS), (length,), generator=g)) for length in lengths]


@pytest.mark.transformers
def test_text_model_takes_tokenizer_output_as_keywords_or_one_dict(tmp_path):
    net, tokenizer = tiny_bert_and_tokenizer(tmp_path)
    encoded = tokenizer(sentences(12), padding=True, return_tensors="pt")
    model = calibrated(wrap(net, exits_after=[0, 1]), encoded, name="maxprob")
    assert model.config is net.config
    assert_same_result(model(**encoded), model(encoded))
    assert_same_result(model(**encoded), model(dict(encoded)))


@pytest.mark.transformers
@pytest.mark.parametrize("batch_size", [None, 4])
def test_text_classification_pipeline_reports_the_adaptive_logits(tmp_path, batch_size):
    from transformers import pipeline

    net, tokenizer = tiny_bert_and_tokenizer(tmp_path)
    texts = sentences(8, seed=3)
    model = calibrated(wrap(net, exits_after=[0, 1]), tokenizer(sentences(40), padding=True, return_tensors="pt"), "maxprob")
    classify = pipeline("text-classification", model=model, tokenizer=tokenizer, device="cpu", batch_size=batch_size, top_k=None)
    got = classify(texts)
    chunks = [texts[i : i + (batch_size or 1)] for i in range(0, len(texts), batch_size or 1)]
    logits = torch.cat([model(tokenizer(chunk, padding=True, return_tensors="pt")).logits for chunk in chunks])
    for scores, row in zip(got, torch.softmax(logits, 1)):
        by_label = {s["label"]: s["score"] for s in scores}
        assert by_label.keys() == {"negative", "neutral", "positive"}
        expected = {net.config.id2label[c]: float(p) for c, p in enumerate(row)}
        assert by_label == pytest.approx(expected, rel=1e-5, abs=1e-6)
