"""Data: sources, prompt templating / tokenisation, and the resumable, sharded iterator."""

import json
import os
import re
import sys

import numpy as np
import pytest

from grpo_jax.config import DataConfig
from grpo_jax.data import (
    R1_SYSTEM_PROMPT,
    DataError,
    ListDataset,
    PromptFormatter,
    batches,
    encode_ids,
    epoch_permutation,
    load_dataset,
    verify_countdown,
)

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_GSM8K_CANDIDATES = [os.environ.get("GRPO_GSM8K_DIR", ""), os.path.join(_ROOT, "..", "shared", "data", "gsm8k"),
                     os.path.join(_ROOT, "shared", "data", "gsm8k"), "/work/shared/data/gsm8k"]
GSM8K_DIR = next((os.path.normpath(d) for d in _GSM8K_CANDIDATES
                  if d and os.path.isfile(os.path.join(d, "train.jsonl"))), "/work/shared/data/gsm8k")
needs_gsm8k = pytest.mark.skipif(not os.path.isfile(os.path.join(GSM8K_DIR, "train.jsonl")),
                                 reason=f"GSM8K files not present at {GSM8K_DIR} (only on the project's machines)")


def cfg(**kw):
    return DataConfig(**kw)


# ------------------------------------------------------------------ built-in tasks


def test_arithmetic_rows_are_correct_and_deterministic():
    ds = load_dataset(cfg(source="arithmetic"), "train", seed=3)
    assert len(ds) > 0
    seen_ops = set()
    for i in range(300):
        row = ds[i]
        m = re.fullmatch(r"What is the (sum|difference|product) of (-?\d+) ([+\-*]) (-?\d+)\?", row["prompt"])
        assert m, row["prompt"]
        a, op, b = int(m.group(2)), m.group(3), int(m.group(4))
        assert row["answer"] == str({"+": a + b, "-": a - b, "*": a * b}[op])
        assert {"sum": "+", "difference": "-", "product": "*"}[m.group(1)] == op
        seen_ops.add(op)
    assert seen_ops == {"+", "-", "*"}
    again = load_dataset(cfg(source="arithmetic"), "train", seed=3)
    assert [again[i] for i in range(20)] == [ds[i] for i in range(20)]
    other = load_dataset(cfg(source="arithmetic"), "train", seed=4)
    assert [other[i]["prompt"] for i in range(20)] != [ds[i]["prompt"] for i in range(20)]


def test_arithmetic_options_prompt_operands_and_sloppy_teacher():
    opts = {"ops": ["sum"], "min_operand": [10, 0], "max_operand": [99, 9], "prompt": "{a}{op}{b}",
            "teacher_skips_carry": 0.7}
    ds = load_dataset(cfg(source="arithmetic", task_options=opts), "train", seed=0)
    carries = sloppy = 0
    for i in range(400):
        row = ds[i]
        assert row["prompt"] == f"{row['a']}+{row['b']}" and 10 <= row["a"] <= 99 and 0 <= row["b"] <= 9
        assert row["answer"] == str(row["a"] + row["b"])
        if row["a"] % 10 + row["b"] < 10:
            assert row["teacher"] == row["answer"]  # nothing to carry: the teacher is right
        else:
            carries += 1
            forgot = str(row["a"] // 10 * 10 + (row["a"] + row["b"]) % 10)  # 47+8 -> "45"
            assert row["teacher"] in (row["answer"], forgot)
            sloppy += row["teacher"] == forgot
    assert 0.6 < sloppy / carries < 0.8, (sloppy, carries)
    for bad, message in [({"prompt": "{c}"}, "valid format string"), ({"max_operand": [9]}, "pair"),
                         ({"min_operand": 50, "max_operand": 10}, "above")]:
        with pytest.raises(DataError, match=message):
            load_dataset(cfg(source="arithmetic", task_options=bad), "train", seed=0)[0]


@pytest.mark.parametrize("source,key", [("arithmetic", lambda r: (r["a"], r["op"], r["b"])),
                                        ("countdown", lambda r: (tuple(sorted(r["numbers"])), r["target"]))])
def test_builtin_train_and_test_are_disjoint(source, key):
    train = load_dataset(cfg(source=source), "train", seed=0)
    test = load_dataset(cfg(source=source), "test", seed=0)
    test_keys = {key(r) for r in test}
    assert len(test) == 500 and len(test_keys) > 100
    assert not test_keys & {key(train[i]) for i in range(3000)}


def test_countdown_rows_and_verifier():
    ds = load_dataset(cfg(source="countdown"), "train", seed=0)
    for i in range(200):
        row = ds[i]
        assert row["answer"] == str(row["target"])
        assert str(row["numbers"]) in row["prompt"] and str(row["target"]) in row["prompt"]
        assert verify_countdown(row["solution"], row["numbers"], row["target"]), row
    nums, target = [3, 5, 7], 22
    assert verify_countdown("3 * 5 + 7", nums, target)
    assert verify_countdown("(7 + 5) * 3 - 14", [7, 5, 3, 14], 22)
    assert verify_countdown("3 × 5 + 7 = 22", nums, target)
    assert verify_countdown("7 + 3 * 5", nums, "22")
    assert not verify_countdown("3 * 5 + 7 = 23", nums, target)
    assert not verify_countdown("3 * 5 + 8", nums, target)  # a number not given
    assert not verify_countdown("3 * 5 + 7 + 0", nums, target)  # an extra number
    assert not verify_countdown("15 + 7", nums, target)  # numbers not used
    assert not verify_countdown("3 * 5 + 7 + 3 - 3", nums, target)  # used twice
    assert not verify_countdown("3 * 5", nums, 15)  # not all used
    assert verify_countdown("3 * 5", nums, 15, use_all=False)
    assert not verify_countdown("7 / (5 - 5) + 3", [7, 5, 5, 3], 3)  # division by zero
    assert verify_countdown("(3 + 5) / 8 * 7", [3, 5, 8, 7], 7)  # exact fractions
    assert not verify_countdown("2 ** 3 + 14", [2, 3, 14], 22)
    assert not verify_countdown("__import__('os').system('true')", nums, target)
    assert not verify_countdown("-3 + 5 * 5", [3, 5, 5], 22)  # unary minus
    assert not verify_countdown("3.0 * 5 + 7", nums, target)
    assert not verify_countdown("(" * 300, nums, target)


def test_unknown_source_names_the_nearest():
    with pytest.raises(DataError, match="did you mean arithmetic"):
        load_dataset(cfg(source="arithmetc"), "train")


# ------------------------------------------------------------------ files


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def test_jsonl_source_and_splits(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"question": f"q{i}", "answer": i, "extra": [i]} for i in range(5)] + [""])
    write_jsonl(tmp_path / "test.jsonl", [{"question": "t0", "answer": "a"}])
    c = cfg(source="jsonl", path=str(tmp_path))
    ds = load_dataset(c, "train")
    assert len(ds) == 5
    assert ds[2] == {"question": "q2", "answer": "2", "extra": [2], "prompt": "q2"}
    assert load_dataset(c, "test")[0]["prompt"] == "t0"
    # a {split} pattern, and a single file that serves the training split only
    assert len(load_dataset(cfg(source="jsonl", path=str(tmp_path / "{split}.jsonl")), "test")) == 1
    single = cfg(source="jsonl", path=str(tmp_path / "train.jsonl"))
    assert len(load_dataset(single, "train")) == 5
    with pytest.raises(DataError, match="training split only"):
        load_dataset(single, "test")
    # custom columns; an empty answer column means no answers
    write_jsonl(tmp_path / "custom.jsonl", [{"text": "hello", "label": "x"}])
    ds = load_dataset(cfg(source="jsonl", path=str(tmp_path / "custom.jsonl"), prompt_column="text",
                          answer_column=""), "train")
    assert ds[0]["prompt"] == "hello" and ds[0]["answer"] is None


def test_jsonl_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    write_jsonl(path, [{"question": "a", "answer": "1"}, "", '{"question": "b", "answer": ',
                       {"question": "c", "answer": "3"}])
    with pytest.raises(DataError) as e:
        load_dataset(cfg(source="jsonl", path=str(path)), "train")
    msg = str(e.value)
    assert f"{path}:3:" in msg and "\n" not in msg
    assert isinstance(e.value, ValueError)
    write_jsonl(path, ["[1, 2]"])
    with pytest.raises(DataError, match=re.escape(f"{path}:1: expected a JSON object")):
        load_dataset(cfg(source="jsonl", path=str(path)), "train")


def test_missing_column_names_column_and_present_ones(tmp_path):
    path = tmp_path / "train.jsonl"
    write_jsonl(path, [{"problem": "a", "solution": "1"}])
    with pytest.raises(DataError) as e:
        load_dataset(cfg(source="jsonl", path=str(path)), "train")
    msg = str(e.value)
    assert "'question'" in msg and "problem, solution" in msg and "\n" not in msg
    write_jsonl(path, [{"question": "a", "solution": "1"}])
    with pytest.raises(DataError, match="'answer'.*question, solution"):
        load_dataset(cfg(source="jsonl", path=str(path)), "train")


def test_empty_dataset_errors(tmp_path):
    path = tmp_path / "train.jsonl"
    write_jsonl(path, ["", "   "])
    with pytest.raises(DataError, match="no rows"):
        load_dataset(cfg(source="jsonl", path=str(path)), "train")
    with pytest.raises(DataError, match="no rows"):
        batches(ListDataset([]), 2)
    with pytest.raises(DataError, match="no .* files for split 'train'"):
        load_dataset(cfg(source="parquet", path=str(tmp_path)), "train")  # a folder without parquet files
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(cfg(source="jsonl", path=str(tmp_path / "nothing_here")), "train")


def test_parquet_source(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "data").mkdir()
    table = pa.table({"question": ["p0", "p1", "p2"], "answer": ["1", "2", None], "n": [0, 1, 2]})
    pq.write_table(table, tmp_path / "data" / "train-00000-of-00001.parquet")
    ds = load_dataset(cfg(source="parquet", path=str(tmp_path)), "train")
    assert len(ds) == 3
    assert ds[1] == {"question": "p1", "answer": "2", "n": 1, "prompt": "p1"}
    assert ds[2]["answer"] is None
    with pytest.raises(DataError, match="no column 'text'.*columns present: question, answer, n"):
        load_dataset(cfg(source="parquet", path=str(tmp_path), prompt_column="text"), "train")
    pq.write_table(table.slice(0, 0), tmp_path / "data" / "test.parquet")
    with pytest.raises(DataError, match="no rows"):
        load_dataset(cfg(source="parquet", path=str(tmp_path)), "test")


# ------------------------------------------------------------------ GSM8K


def _first_line(split):
    with open(os.path.join(GSM8K_DIR, f"{split}.jsonl")) as f:
        return json.loads(f.readline())


@needs_gsm8k
def test_gsm8k_tfds_builder_from_manual_dir(tmp_path):
    import tensorflow_datasets as tfds

    from grpo_jax.data import gsm8k

    gsm8k.prepare(data_dir=str(tmp_path), manual_dir=GSM8K_DIR)
    for split, n in (("train", 7473), ("test", 1319)):
        source = tfds.data_source("grpo_gsm8k", split=split, data_dir=str(tmp_path))
        assert len(source) == n
        first = _first_line(split)
        assert source[0]["question"].decode() == first["question"]
        assert source[0]["final_answer"].decode() == first["answer"].split("####")[-1].strip().replace(",", "")
    # through the data config: tfds:grpo_gsm8k answers with the final number, keeps the solution
    ds = load_dataset(cfg(source="tfds:grpo_gsm8k", path=str(tmp_path)), "test")
    first = _first_line("test")
    assert len(ds) == 1319
    assert ds[0]["prompt"] == first["question"] and ds[0]["solution"] == first["answer"]
    assert ds[0]["answer"] == "18"  # Janet's ducks
    assert "tensorflow" not in sys.modules, "the tfds path must not need TensorFlow"


@needs_gsm8k
def test_gsm8k_folder_source():
    ds = load_dataset(cfg(source="gsm8k", path=GSM8K_DIR), "train")
    first = _first_line("train")
    assert len(ds) == 7473
    assert ds[0]["prompt"] == first["question"] and ds[0]["answer"] == "72" and ds[0]["solution"] == first["answer"]
    assert len(load_dataset(cfg(source="gsm8k", path=GSM8K_DIR), "test")) == 1319


def test_gsm8k_builder_downloads_when_no_manual_dir(tmp_path, monkeypatch):
    """The download path, served offline from a local HTTP server with small made-up files."""
    import functools
    import http.server
    import threading

    from grpo_jax.data import gsm8k

    served = tmp_path / "served"
    served.mkdir()
    for split, n in (("train", 5), ("test", 2)):
        write_jsonl(served / f"{split}.jsonl",
                    [{"question": f"{split} q{i}?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(n)])

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        monkeypatch.setitem(gsm8k.URLS, "train", f"{base}/train.jsonl")
        monkeypatch.setitem(gsm8k.URLS, "test", f"{base}/test.jsonl")
        gsm8k.prepare(data_dir=str(tmp_path / "tfds"))
    finally:
        server.shutdown()
    ds = load_dataset(cfg(source="tfds:grpo_gsm8k", path=str(tmp_path / "tfds")), "train")
    assert [ds[i]["prompt"] for i in range(5)] == [f"train q{i}?" for i in range(5)]  # file order kept
    assert [ds[i]["answer"] for i in range(5)] == ["1", "2", "3", "4", "5"]
    assert len(load_dataset(cfg(source="tfds:grpo_gsm8k", path=str(tmp_path / "tfds")), "test")) == 2


def test_gsm8k_final_answer_parser():
    from grpo_jax.data.gsm8k import parse_final_answer

    assert parse_final_answer("so 5+5=10\n#### 1,000") == "1000"
    assert parse_final_answer("no marker") is None


def test_tfds_unknown_dataset_is_one_line(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset(cfg(source="tfds:surely_not_a_dataset_xyz", path=str(tmp_path)), "train")
    assert "\n" not in str(e.value) and "surely_not_a_dataset_xyz" in str(e.value)


# ------------------------------------------------------------------ reasoning-gym


def test_reasoning_gym_source():
    pytest.importorskip("reasoning_gym", reason="reasoning-gym not installed")
    c = cfg(source="reasoning_gym:leg_counting")
    train = load_dataset(c, "train", seed=0)
    test = load_dataset(c, "test", seed=0)
    row = train[0]
    assert isinstance(row["prompt"], str) and row["answer"]
    assert row["rg_score"](row["answer"]) == 1.0
    assert row["rg_score"]("not a number") < 1.0
    assert row["rg_entry"]["question"] == row["prompt"]
    assert train[0]["prompt"] != test[0]["prompt"]
    assert load_dataset(c, "train", seed=0)[5]["prompt"] == train[5]["prompt"]
    with pytest.raises(DataError, match="did you mean leg_counting"):
        load_dataset(cfg(source="reasoning_gym:leg_countin"), "train")


# ------------------------------------------------------------------ prompts


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    words += "what is the sum of + - * ? user : assistant a b c d e f g h".split()
    words += [str(i) for i in range(100)]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Split(Regex(r"<\|[a-z]+\|>|<s>|\w+|[^\w\s]"), behavior="isolated")])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    t = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                unk_token="<unk>")
    t.chat_template = ("<s>{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
                       "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    return t


def test_chat_template_and_system_prompt(tokenizer):
    fmt = PromptFormatter.from_config(cfg(system_prompt="r1"), tokenizer)
    assert fmt.system_prompt == R1_SYSTEM_PROMPT and "<think>" in R1_SYSTEM_PROMPT and "<answer>" in R1_SYSTEM_PROMPT
    text = fmt.text("what is 1 + 2 ?")
    assert text.startswith("<s><|system|> " + R1_SYSTEM_PROMPT)
    assert text.endswith("<|user|> what is 1 + 2 ? <|end|> <|assistant|>")
    fmt = PromptFormatter(tokenizer)  # no system prompt
    assert fmt.text("a b") == "<s><|user|> a b <|end|> <|assistant|>"
    enc = fmt.encode(["a b"], max_prompt_length=32)
    assert enc.ids[0].tolist() == tokenizer.convert_tokens_to_ids(
        ["<s>", "<|user|>", "a", "b", "<|end|>", "<|assistant|>"])  # one BOS: the template's
    # chat messages from the row are used as they are (the system prompt is added when absent)
    msgs = [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}, {"role": "user", "content": "e"}]
    assert PromptFormatter(tokenizer, "f g").text(msgs) == \
        "<s><|system|> f g <|end|> <|user|> c <|end|> <|assistant|> d <|end|> <|user|> e <|end|> <|assistant|>"
    # plain: the text itself with the tokenizer's BOS, or the R1-Zero layout with a system prompt
    plain = PromptFormatter(tokenizer, chat_template=False)
    assert plain.text("a b") == "a b"
    assert plain.encode(["a b"], 8).ids[0].tolist() == tokenizer.convert_tokens_to_ids(["<s>", "a", "b"])
    assert PromptFormatter(tokenizer, "h", chat_template=False).text("a") == "h\nUser: a\nAssistant:"
    with pytest.raises(DataError, match="chat template"):
        plain.text(msgs)


def test_assistant_prefix_ends_the_prompt_and_starts_each_completion(tokenizer):
    from grpo_jax.policy import decode_completions

    fmt = PromptFormatter.from_config(cfg(assistant_prefix=" c"), tokenizer)
    assert fmt.text("a b") == "<s><|user|> a b <|end|> <|assistant|> c"
    assert fmt.encode(["a b"], 32).ids[0].tolist()[-2:] == tokenizer.convert_tokens_to_ids(["<|assistant|>", "c"])
    assert PromptFormatter(tokenizer, chat_template=False, assistant_prefix=" c").text("a") == "a c"
    tokens = np.asarray([tokenizer.convert_tokens_to_ids(["d", "e", "</s>"])])
    mask = np.asarray([[True, True, False]])
    plain = decode_completions(tokenizer, tokens, mask)
    assert decode_completions(tokenizer, tokens, mask, fmt.assistant_prefix) == [" c" + plain[0]]


def test_left_padding_truncation_and_drop_counts(tokenizer):
    fmt = PromptFormatter(tokenizer, chat_template=False)
    prompts = ["a", "a b c", "a b c d e f g h", "b c"]  # 2, 4, 9, 3 tokens with BOS
    enc = fmt.encode(prompts, max_prompt_length=5, overlong="truncate_left")
    assert enc.ids.dtype == np.int32 and enc.mask.dtype == bool and enc.ids.shape == (4, 5)
    assert enc.num_truncated == 1 and enc.num_dropped == 0 and enc.kept.tolist() == [0, 1, 2, 3]
    assert enc.mask.sum(1).tolist() == [2, 4, 5, 3]
    assert enc.mask[:, -1].all() and not enc.mask[0, :3].any()
    pad = tokenizer.pad_token_id
    assert enc.ids[0].tolist() == [pad, pad, pad] + tokenizer.convert_tokens_to_ids(["<s>", "a"])
    assert enc.ids[2].tolist() == tokenizer.convert_tokens_to_ids(["d", "e", "f", "g", "h"])  # the end is kept
    enc = fmt.encode(prompts, max_prompt_length=5, overlong="drop")
    assert enc.num_dropped == 1 and enc.num_truncated == 0 and enc.kept.tolist() == [0, 1, 3]
    assert enc.ids.shape == (3, 4)  # padded to the longest kept prompt
    assert enc.metrics()["data/prompts_dropped"] == 1.0
    assert encode_ids([[1, 2]], 8, pad_id=0, pad_to=6).ids.tolist() == [[0, 0, 0, 0, 1, 2]]
    assert fmt.is_overlong("a b c d e f g h", 5) and not fmt.is_overlong("a b", 5)


# ------------------------------------------------------------------ iterator


def numbered(n):
    return ListDataset([{"prompt": f"p{i}", "answer": str(i), "i": i} for i in range(n)])


def take(it, k):
    return [next(it) for _ in range(k)]


def test_iterator_epochs_are_permutations_and_deterministic():
    ds = numbered(10)
    got = [b["index"] for b in take(batches(ds, 4, seed=7), 5)]  # 20 rows = 2 epochs
    flat = sum(got, [])
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert flat[:10] == epoch_permutation(10, 7, 0).tolist() and flat[10:] == epoch_permutation(10, 7, 1).tolist()
    assert flat[:10] != flat[10:]
    assert [b["index"] for b in take(batches(ds, 4, seed=7), 5)] == got
    assert [b["index"] for b in take(batches(ds, 4, seed=8), 5)] != got
    batch = next(batches(ds, 3, shuffle=False))
    assert batch["index"] == [0, 1, 2] and batch["prompt"] == ["p0", "p1", "p2"] and batch["i"] == [0, 1, 2]
    assert batch["valid"] == [True] * 3


def test_iterator_resume_mid_epoch_gives_the_same_batches():
    ds = numbered(23)
    it = batches(ds, 5, seed=1)
    take(it, 3)
    state = it.state()
    assert state == {"epoch": 0, "position": 15, "dropped": 0}
    assert all(type(v) is int for v in state.values())
    expected = take(it, 6)  # crosses into epoch 1
    resumed = batches(ds, 5, seed=1, state=json.loads(json.dumps(state)))
    assert take(resumed, 6) == expected
    other = batches(ds, 5, seed=1)
    other.restore(state)
    assert take(other, 6) == expected
    with pytest.raises(DataError, match="does not fit"):
        batches(ds, 5, state={"epoch": 0, "position": 99})


def test_iterator_shards_union_to_the_global_batch():
    ds = numbered(17)
    glob = batches(ds, 6, seed=2)
    p0, p1 = (batches(ds, 6, seed=2, process_index=i, process_count=2) for i in (0, 1))
    for _ in range(7):
        g, a, b = next(glob), next(p0), next(p1)
        assert len(a["index"]) == len(b["index"]) == 3
        assert a["index"] + b["index"] == g["index"]
        assert a["prompt"] + b["prompt"] == g["prompt"]
    assert p0.state() == p1.state() == glob.state()
    with pytest.raises(DataError, match="split evenly"):
        batches(ds, 5, process_count=2)


def test_eval_one_pass_with_short_or_padded_last_batch():
    ds = numbered(10)
    got = list(batches(ds, 4, repeat=False, shuffle=False))
    assert [b["index"] for b in got] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert batches(ds, 4, repeat=False).num_batches == 3
    padded = list(batches(ds, 4, repeat=False, shuffle=False, pad_last=True))
    assert padded[-1]["index"] == [8, 9, 9, 9] and padded[-1]["valid"] == [True, True, False, False]
    shards = [list(batches(ds, 4, repeat=False, shuffle=False, process_index=i, process_count=2)) for i in range(2)]
    assert [a["index"] + b["index"] for a, b in zip(*shards)] == [b["index"] for b in got]


def test_iterator_keep_drops_rows_and_keeps_batches_full():
    ds = numbered(12)
    keep = lambda row: row["i"] % 3 != 0  # noqa: E731
    it = batches(ds, 4, seed=0, keep=keep)
    got = take(it, 4)  # 8 rows kept per epoch -> 2 epochs
    assert all(len(b["index"]) == 4 and all(i % 3 for i in b["index"]) for b in got)
    assert it.state()["dropped"] == 8
    it2 = batches(ds, 4, seed=0, keep=keep)
    take(it2, 1)
    resumed = batches(ds, 4, seed=0, keep=keep, state=it2.state())
    assert take(resumed, 3) == got[1:]
    shards = [batches(ds, 4, seed=0, keep=keep, process_index=i, process_count=2) for i in range(2)]
    for g in got:
        a, b = next(shards[0]), next(shards[1])
        assert a["index"] + b["index"] == g["index"]
    with pytest.raises(DataError, match="every row was dropped"):
        next(batches(ds, 4, keep=lambda row: False))
