"""Reward functions, registry, and batch scoring (host thread pool + device rewards)."""

import math
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import grpo_jax.rewards.math as rmath
from grpo_jax.rewards import (
    RewardError,
    RewardSet,
    available_rewards,
    compute_rewards,
    extract_answer,
    extract_reference,
    get_reward,
    is_device_reward,
    parse_spec,
    register,
)

R1 = "<think>\n{think}\n</think>\n<answer>\n{answer}\n</answer>"


def score(name, completions, prompts=None, **columns):
    fn = get_reward(name)
    prompts = prompts if prompts is not None else ["p"] * len(completions)
    return fn(prompts, completions, **columns)


def approx_list(values):
    return [None if v is None else pytest.approx(v, abs=1e-6) for v in values]


# ---------------------------------------------------------------------------
# accuracy

ACCURACY_CASES = [
    # completion, reference, expected
    (R1.format(think="48/2 = 24", answer="72"), "Natalia sold 48/2 = 24 clips.\n#### 72", 1.0),
    (R1.format(think="...", answer="71"), "#### 72", 0.0),
    ("So the answer is \\boxed{\\frac{1}{2}}.", "0.5", 1.0),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", 1.0),  # math-verify (symbolic)
    ("x = \\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1.0),
    ("<answer>x = 5</answer>", "5", 1.0),
    ("<answer>$18.00</answer>", "#### 18", 1.0),
    ("The total is $1,000.", "1000", 1.0),  # last number fallback, commas
    ("#### 3/4", "\\frac34", 1.0),
    ("the answer is 7 then 8", "7", 0.0),  # last number is 8
    ("\\boxed{\\frac{1}{2", "0.5", 0.0),  # malformed: unclosed box, last number 2
    ("", "5", 0.0),
    ("no number here", "5", 0.0),
    ("42", None, None),
    ("42", "", None),
]


@pytest.mark.parametrize("completion,reference,expected", ACCURACY_CASES)
def test_accuracy_table(completion, reference, expected):
    assert score("accuracy", [completion], answer=[reference]) == [expected]


def test_accuracy_solution_column_and_no_reference_column():
    assert score("accuracy", ["\\boxed{3}"], solution=["$3$"]) == [1.0]
    assert score("accuracy", ["\\boxed{3}"]) == [None]


@pytest.mark.parametrize(
    "text,expected",
    [
        ("<answer> \\boxed{7} </answer> 9", "7"),
        ("<answer>a</answer> <answer>b</answer>", "b"),
        ("\\boxed{\\frac{a}{b}} and \\boxed{x^{2}}", "x^{2}"),
        ("work\n#### 1,234", "1,234"),
        ("-3.5 degrees", "-3.5"),
        ("<answer></answer>", None),
        ("", None),
        (None, None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_reference_keeps_symbolic_answers_whole():
    assert extract_reference("x^2 + 1") == "x^2 + 1"
    assert extract_reference("blah\n#### 72") == "72"
    assert extract_reference(float("nan")) is None
    assert extract_reference(["5", "five"]) == "5"


@pytest.fixture
def math_verify_mode():
    """Set math-verify's mode for one test, restoring the settings and the worker pool after."""
    previous = rmath.SETTINGS

    def set_mode(**changes):
        rmath.configure_math_verify(**changes)

    yield set_mode
    rmath.SETTINGS = previous
    rmath._warned_inline = False


@pytest.mark.parametrize(
    "completion,reference,expected",
    [("\\boxed{18.0}", "18", 1.0), ("\\boxed{\\dfrac{1}{2}}", "0.5", 1.0), ("1/2", "\\frac{1}{2}", 1.0),
     ("\\boxed{\\$18}", "18", 1.0), ("\\boxed{10\\%}", "10", 1.0), ("\\boxed{x+1}", "x + 1", 1.0),
     ("\\boxed{19}", "18", 0.0), ("\\boxed{\\sqrt{8}}", "2\\sqrt{2}", 0.0)],  # no math-verify: no algebra
)
def test_accuracy_exact_fallback_without_math_verify(math_verify_mode, completion, reference, expected):
    math_verify_mode(mode="off")
    assert not rmath.math_verify_available()
    assert score("accuracy", [completion], answer=[reference]) == [expected]


@pytest.mark.parametrize("mode", ["subprocess", "inline"])
def test_math_verify_in_worker_threads(math_verify_mode, mode):
    math_verify_mode(mode=mode)
    assert rmath.math_verify_available()
    pairs = [("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}"), ("2\\sqrt{2}", "\\sqrt{8}"), ("x = 5", "5"),
             ("3", "4")] * 4

    def check(pair):
        assert threading.current_thread() is not threading.main_thread()
        return rmath.math_verify_match(*pair)

    with ThreadPoolExecutor(4) as pool:
        verdicts = list(pool.map(check, pairs))
    assert verdicts == [True, True, True, False] * 4  # not None: math-verify ran (no SIGALRM error)

    # The same through a RewardSet's own pool.
    completions = [f"\\boxed{{{a}}}" for a, _ in pairs]
    refs = [b for _, b in pairs]
    with RewardSet(["accuracy"], num_workers=2) as rs:
        result = rs.submit(["p"] * len(pairs), completions, {"answer": refs}).result(timeout=60)
    assert result.rewards[:, 0].tolist() == [1.0, 1.0, 1.0, 0.0] * 4


def test_math_verify_subprocess_timeout_and_fallback(math_verify_mode, tmp_path, monkeypatch):
    math_verify_mode(mode="subprocess", timeout_s=0.5)
    # A worker that never answers is killed after timeout + grace, and the comparison scores None.
    stuck = tmp_path / "stuck.py"
    stuck.write_text("import sys, time\nprint('{\"ready\": true}', flush=True)\ntime.sleep(600)\n")
    monkeypatch.setattr(rmath, "_WORKER_SCRIPT", str(stuck))
    monkeypatch.setattr(rmath, "_POOL", None)
    start = time.monotonic()
    assert rmath.math_verify_match("2\\sqrt{2}", "\\sqrt{8}") is None
    assert time.monotonic() - start < 10
    assert not rmath._POOL.workers  # killed, not reused
    rmath._POOL.close()
    # A worker that cannot start: math-verify runs in-process instead.
    broken = tmp_path / "broken.py"
    broken.write_text("print('{\"ready\": false, \"error\": \"no math-verify\"}', flush=True)\n")
    monkeypatch.setattr(rmath, "_WORKER_SCRIPT", str(broken))
    monkeypatch.setattr(rmath, "_POOL", None)
    assert rmath.math_verify_match("2\\sqrt{2}", "\\sqrt{8}") is True
    assert rmath._POOL.broken and "no math-verify" in rmath._POOL.broken


def test_math_verify_pathological_answer_is_bounded(math_verify_mode):
    math_verify_mode(mode="subprocess", timeout_s=1)
    start = time.monotonic()
    assert score("accuracy", ["\\boxed{9^{9^{9^{9}}}}"], answer=["1"]) == [0.0]
    assert time.monotonic() - start < 10


# ---------------------------------------------------------------------------
# format and tags

GOOD = R1.format(think="reasoning", answer="42")


@pytest.mark.parametrize(
    "completion,strict,lenient",
    [
        (GOOD, 1.0, 1.0),
        (R1.format(think="multi\nline", answer="a\nb"), 1.0, 1.0),
        ("<think>reasoning</think><answer>42</answer>", 0.0, 1.0),  # no newlines
        ("  <think> r </think>\n\n<answer> 42 </answer>\n", 0.0, 1.0),
        (GOOD + " trailing text", 0.0, 0.0),
        ("<think>\nreasoning\n</think>\n42", 0.0, 0.0),  # no answer block
        ("<answer>\n42\n</answer>", 0.0, 0.0),
        ("", 0.0, 0.0),
    ],
)
def test_format_table(completion, strict, lenient):
    assert score("format", [completion]) == [strict]
    assert score("format_lenient", [completion]) == [lenient]


def test_number_only():
    assert score("number_only", ["12", " -3\n", "1,024", "0.5", "12 apples", "<answer>12</answer>", ""]) == \
        [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]


def test_format_with_think_opened_by_prompt():
    completion = "reasoning\n</think>\n<answer>\n42\n</answer>"
    assert score("format", [completion], prompts=["Question? Assistant: <think>"]) == [1.0]
    assert score("format", [completion], prompts=["Question?"]) == [0.0]
    assert score("tag_count", [completion], prompts=["Q <think>\n"]) == [1.0]


@pytest.mark.parametrize(
    "completion,expected",
    [
        (GOOD, 1.0),
        ("<think>\nreasoning\n</think>\n", 0.5),
        ("<think>\na\n</think>\n<think>\nb\n</think>\n<answer>\n1\n</answer>", 0.5),  # think tags twice
        ("<answer>42</answer>", 0.0),
        ("", 0.0),
    ],
)
def test_tag_count_table(completion, expected):
    assert score("tag_count", [completion]) == [expected]


# ---------------------------------------------------------------------------
# language consistency, reasoning steps, repetition


@pytest.mark.parametrize(
    "spec,completion,expected",
    [
        ("language_consistency", "The answer is forty two.", 1.0),
        ("language_consistency", "The answer is 四十", 0.6),  # 3 Latin words of 5 (each ideograph is a word)
        ("language_consistency", "答案是四十二", 0.0),
        ("language_consistency(target='zh')", "答案是四十二", 1.0),
        ("language_consistency(target='zh')", "答案 is 42", pytest.approx(2 / 3)),  # digits are not words
        ("language_consistency(target='ru')", "Ответ: сорок два (forty two)", 0.6),
        ("language_consistency", "Ça coûte 3 €, déjà payé.", 1.0),  # accented Latin counts as Latin
        ("language_consistency", "<think>\n好的\n</think>\n<answer>\nyes\n</answer>", pytest.approx(1 / 3)),
        ("language_consistency(section='answer')", "<think>\n好的\n</think>\n<answer>\nyes\n</answer>", 1.0),
        ("language_consistency(section='think')", "<think>\n好的\n</think>\n<answer>\nyes\n</answer>", 0.0),
        ("language_consistency(section='think')", "no think block", None),
        ("language_consistency", "", None),
        ("language_consistency", "12 + 30 = 42", None),
    ],
)
def test_language_consistency_table(spec, completion, expected):
    assert score(spec, [completion]) == [expected]


def test_language_consistency_unknown_language():
    with pytest.raises(RewardError, match="unknown language 'klingon'"):
        get_reward("language_consistency(target='klingon')")


@pytest.mark.parametrize(
    "completion,expected",
    [
        ("Step 1: add. Step 2: multiply. Step 3: done.", 1.0),
        ("First, we add. Next, we multiply.", 2 / 3),
        ("1. add\n2. multiply\n3. check\n4. done", 1.0),
        ("Plan:\n- add\n* multiply", 2 / 3),
        ("The value is 3.14 and that is all.", 0.0),
        ("", 0.0),
    ],
)
def test_reasoning_steps_table(completion, expected):
    assert score("reasoning_steps", [completion]) == [pytest.approx(expected)]


@pytest.mark.parametrize(
    "spec,completion,expected",
    [
        ("repetition", "the cat sat on the mat today", 0.0),
        ("repetition", "a b c a b c", -0.25),  # trigrams: abc bca cab abc -> 1 - 3/4
        ("repetition", "go go go go go go", -0.75),  # 4 trigrams, 1 unique
        ("repetition(max_penalty=-0.5)", "go go go go go go", -0.375),
        ("repetition(ngram_size=2)", "a b a b", pytest.approx(-1 / 3)),
        ("repetition", "two words", 0.0),
        ("repetition", "", 0.0),
    ],
)
def test_repetition_table(spec, completion, expected):
    assert score(spec, [completion]) == [expected]


def test_repetition_bad_parameters():
    with pytest.raises(RewardError, match="max_penalty must be <= 0"):
        get_reward("repetition(max_penalty=1)")


# ---------------------------------------------------------------------------
# length-shaped rewards


def test_length_kimi_within_groups():
    # Group "a": lengths 10 / 20 / 30 chars; group "b": all equal.
    comps = ["\\boxed{1}" + " " * 1, "\\boxed{1}" + " " * 11, "\\boxed{2}" + " " * 21, "\\boxed{1}", "\\boxed{2}"]
    prompts = ["a", "a", "a", "b", "b"]
    answers = ["1", "1", "1", "1", None]
    out = score("length", comps, prompts=prompts, answer=answers)
    # a: lambdas 0.5, 0.0, -0.5; the third is wrong -> min(0, -0.5). b: equal lengths -> 0; no reference -> None.
    assert out == approx_list([0.5, 0.0, -0.5, 0.0, None])
    # Wrong but short: min(0, 0.5) = 0.
    out = score("length", ["\\boxed{9}", "\\boxed{1}    "], prompts=["a", "a"], answer=["1", "1"])
    assert out == approx_list([0.0, -0.5])


def test_length_group_size_and_token_lengths():
    fn = get_reward("length(group_size=2)")
    out = fn(["x", "y", "x", "y"], ["\\boxed{1}"] * 4, answer=["1"] * 4, completion_lengths=[10, 20, 5, 5])
    assert out == approx_list([0.5, -0.5, 0.0, 0.0])
    with pytest.raises(RewardError, match="do not split into groups of 3"):
        get_reward("length(group_size=3)")(["x"] * 4, ["1"] * 4, answer=["1"] * 4)


@pytest.mark.parametrize(
    "completion,reference,lengths,expected",
    [
        ("\\boxed{1}", "1", 0, 1.0),  # correct, shortest: max_value_correct
        ("\\boxed{1}", "1", 100, 0.5),  # correct at max_len: min_value_correct
        ("\\boxed{1}", "1", 50, 0.75),
        ("\\boxed{1}", "1", 500, 0.5),  # past max_len counts as max_len
        ("\\boxed{2}", "1", 0, -1.0),  # wrong and short: harshest
        ("\\boxed{2}", "1", 100, -0.5),
        ("", "1", 0, -1.0),
        ("\\boxed{1}", None, 0, None),
    ],
)
def test_cosine_table(completion, reference, lengths, expected):
    fn = get_reward("cosine(max_len=100)")
    assert fn(["p"], [completion], answer=[reference], completion_lengths=[lengths]) == approx_list([expected])


def test_cosine_counts_characters_without_lengths_column():
    fn = get_reward({"name": "cosine", "max_len": 18})
    assert fn(["p"], ["\\boxed{1}" + " " * 9], answer=["1"]) == approx_list([0.5])


@pytest.mark.parametrize(
    "lengths,expected",
    [(0, 0.0), (96, 0.0), (97, -1 / 32), (112, -0.5), (128, -1.0), (300, -1.0)],
)
def test_soft_overlong_table(lengths, expected):
    fn = get_reward("soft_overlong(max_completion_len=128, soft_cache_len=32)")
    assert fn(["p"], ["x"], completion_lengths=[lengths]) == approx_list([expected])


def test_soft_overlong_whitespace_words_and_context():
    fn = get_reward("soft_overlong", context={"max_completion_len": 8})  # cache defaults to 8 // 4 = 2
    assert fn(["p"] * 4, ["a " * 6, "a " * 7, "a " * 8, ""], ) == approx_list([0.0, -0.5, -1.0, 0.0])
    with pytest.raises(RewardError, match="soft_cache_len"):
        get_reward("soft_overlong(max_completion_len=10, soft_cache_len=20)")


# ---------------------------------------------------------------------------
# dataset scorer


def test_dataset_scorer():
    def score_answer(answer, entry):
        return 1.0 if answer == entry["answer"] else 0.01

    fn = get_reward("dataset_scorer")
    comps = ["<answer>cat</answer>", "<answer>dog</answer>", "cat", "<answer>cat</answer>"]
    out = fn(["p"] * 4, comps, scorer=[score_answer, score_answer, score_answer, None],
             entry=[{"answer": "cat"}] * 4)
    assert out == [1.0, 0.01, 0.01, None]
    # Without an entry column the scorer gets the row's other columns; "auto" falls back to the text.
    auto = get_reward("dataset_scorer(extract='auto')")
    assert auto(["p"], ["cat"], scorer=[score_answer], answer=["cat"]) == [1.0]
    assert fn(["p"], ["cat"]) == [None]  # no scorer column


# ---------------------------------------------------------------------------
# registry and resolution


def test_registry_names_and_specs():
    names = available_rewards()
    for name in ("accuracy", "format", "format_lenient", "tag_count", "language_consistency", "reasoning_steps",
                 "length", "cosine", "repetition", "soft_overlong", "dataset_scorer", "target_token"):
        assert name in names
    assert get_reward("accuracy") is rmath.accuracy
    assert get_reward("cosine(max_len=10)").reward_name == "cosine"
    assert parse_spec("cosine(max_len=10, min_value_wrong=-2.0)") == ("cosine",
                                                                       {"max_len": 10, "min_value_wrong": -2.0})
    assert parse_spec({"name": "cosine", "max_len": 10}) == ("cosine", {"max_len": 10})
    assert parse_spec(" accuracy ") == ("accuracy", {})


def test_import_path_resolution(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        def only_answer(prompts, completions, answer):
            return [float(c == a) for c, a in zip(completions, answer)]

        def make_const(value=1.0):
            def const(prompts, completions, **kw):
                return [value] * len(completions)
            return const

        NOT_CALLABLE = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = get_reward("my_rewards:only_answer")
    assert fn.reward_name == "only_answer"
    # Only the columns it names are passed (no **kwargs): `extra` is dropped.
    result = compute_rewards(["my_rewards:only_answer", "my_rewards:make_const(value=0.5)"], None,
                             ["p", "p"], ["a", "b"], {"answer": ["a", "a"], "extra": [1, 2]})
    assert result.names == ["only_answer", "make_const"]
    assert result.rewards.tolist() == [[1.0, 0.5], [0.0, 0.5]]
    assert get_reward("grpo_jax.rewards.text:reasoning_steps")(["p"], ["Step 1: a"]) == [pytest.approx(1 / 3)]

    with pytest.raises(RewardError) as e:
        get_reward("no_such_package.rewards:fn")
    msg = str(e.value)
    assert "\n" not in msg and "no_such_package.rewards:fn" in msg and "ModuleNotFoundError" in msg
    with pytest.raises(RewardError, match="has no attribute 'missing'"):
        get_reward("my_rewards:missing")
    with pytest.raises(RewardError, match="not a function"):
        get_reward("my_rewards:NOT_CALLABLE")


def test_registry_errors_are_one_line_with_suggestions():
    with pytest.raises(RewardError) as e:
        get_reward("acuracy")
    assert "did you mean 'accuracy'" in str(e.value) and "available:" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(RewardError, match="did you mean 'max_len'"):
        get_reward("cosine(max_lenn=3)")
    with pytest.raises(RewardError, match="takes no parameters"):
        get_reward("accuracy(x=1)")
    with pytest.raises(RewardError, match="cannot parse"):
        get_reward("cosine(max_len=)")
    with pytest.raises(RewardError, match="only keyword arguments"):
        get_reward("cosine(3)")
    with pytest.raises(RewardError, match="already registered"):
        register("accuracy")(lambda prompts, completions, **kw: [0.0] * len(completions))


# ---------------------------------------------------------------------------
# batch scoring


def test_weighted_sum_with_none_and_means():
    def half_none(prompts, completions, **kw):
        return [None if i % 2 else 1.0 for i in range(len(completions))]

    def twos(prompts, completions, **kw):
        return np.full(len(completions), 2.0)

    def all_none(prompts, completions, **kw):
        return [None] * len(completions)

    result = compute_rewards([half_none, twos, all_none], [0.5, 1.0, 3.0], ["p"] * 4, ["a", "b", "c", "d"])
    assert result.rewards.dtype == np.float32 and result.rewards.shape == (4, 3)
    assert np.isnan(result.rewards[1, 0]) and not np.isnan(result.rewards[0, 0])
    assert result.total.tolist() == [2.5, 2.0, 2.5, 2.0]  # None counts as 0 in the sum
    assert result.means["half_none"] == 1.0 and result.means["twos"] == 2.0 and math.isnan(result.means["all_none"])
    stats = result.stats()
    assert stats["rewards/half_none/mean"] == 1.0 and stats["rewards/total/mean"] == pytest.approx(2.25)
    assert stats["rewards/twos/errors"] == 0.0


def test_builtin_set_end_to_end_and_duplicate_names():
    comps = [GOOD, "<think>\nhm\n</think>\n<answer>\n41\n</answer>", "42"]
    with RewardSet(["accuracy", "format", "cosine", "cosine(max_len=5)"], weights=[1.0, 0.5, 0.0, 0.0]) as rs:
        assert rs.names == ["accuracy", "format", "cosine", "cosine_2"]
        result = rs(["p"] * 3, comps, {"answer": ["42"] * 3})
    assert result.rewards[:, 0].tolist() == [1.0, 0.0, 1.0]
    assert result.rewards[:, 1].tolist() == [1.0, 1.0, 0.0]
    assert result.total.tolist() == [1.5, 0.5, 1.0]


@pytest.mark.parametrize(
    "output,match",
    [
        ([1.0], "returned 1 values for 3 completions"),
        ([1.0, "x", 2.0], "returned a str .* at index 1"),
        (1.0, "returned a float, expected a list of 3"),
        ([1.0, float("inf"), 0.0], "returned inf at index 1; rewards must be finite"),
        (np.zeros((3, 1)), r"returned an array of shape \(3, 1\)"),
    ],
)
def test_malformed_results(output, match):
    def bad(prompts, completions, **kw):
        return output

    with pytest.raises(RewardError, match=f"reward 'bad' {match}"):
        compute_rewards([bad], None, ["p"] * 3, ["a", "b", "c"])


def test_input_validation():
    with pytest.raises(RewardError, match="column 'answer' has 1 values for 2 completions"):
        compute_rewards(["accuracy"], None, ["p", "p"], ["a", "b"], {"answer": ["1"]})
    with pytest.raises(RewardError, match="got 2 reward weights for 1 reward functions"):
        RewardSet(["accuracy"], weights=[1.0, 2.0])
    with pytest.raises(RewardError, match="got 1 prompts for 2 completions"):
        compute_rewards(["format"], None, ["p"], ["a", "b"])


def flaky(prompts, completions, **kw):
    out = []
    for c in completions:
        if "boom" in c:
            raise ZeroDivisionError("cannot score this")
        out.append(float(len(c)))
    return out


def test_on_error_stop_names_function_exception_and_completion():
    comps = ["fine", "this one goes boom\nwith a second line" + "!" * 500, "ok"]
    with pytest.raises(RewardError) as e:
        compute_rewards([flaky], None, ["p"] * 3, comps, on_error="stop")
    msg = str(e.value)
    assert "\n" not in msg
    assert "reward 'flaky' raised ZeroDivisionError: cannot score this on completion 1" in msg
    assert "this one goes boom" in msg and len(msg) < 400  # completion truncated


def test_on_error_none_counts_errors():
    comps = ["fine", "boom", "ok", "boom again"]
    with RewardSet([flaky, "format"], on_error="none", num_workers=2) as rs:
        result = rs.submit(["p"] * 4, comps).result(timeout=30)
    col = result.rewards[:, 0]
    assert col[0] == 4.0 and col[2] == 2.0 and np.isnan(col[1]) and np.isnan(col[3])
    assert result.num_errors == {"flaky": 2, "format": 0}
    assert result.stats()["rewards/flaky/errors"] == 2.0
    assert result.total.tolist() == [4.0, 0.0, 2.0, 0.0]


def test_on_error_group_reward_is_not_rerun_per_completion():
    def group_fn(prompts, completions, **kw):
        raise RuntimeError("needs the whole group")

    group_fn.per_completion = False
    result = compute_rewards([group_fn], None, ["p"] * 2, ["a", "b"], on_error="none")
    assert np.isnan(result.rewards).all() and result.num_errors == {"group_fn": 2}
    with pytest.raises(RewardError,
                       match="reward 'group_fn' raised RuntimeError: needs the whole group on a batch of 2"):
        compute_rewards([group_fn], None, ["p"] * 2, ["a", "b"], on_error="stop")


def test_submit_overlaps_and_returns_future():
    gate = threading.Event()

    def slow(prompts, completions, **kw):
        gate.wait(10)
        return [1.0] * len(completions)

    with RewardSet([slow, "format"], num_workers=2) as rs:
        future = rs.submit(["p"], ["x"])
        assert not future.done()  # the caller is free (e.g. to run the next device step)
        gate.set()
        assert future.result(timeout=10).rewards.tolist() == [[1.0, 0.0]]
    # stop-mode errors surface from .result()
    with RewardSet([flaky], num_workers=1) as rs:
        with pytest.raises(RewardError, match="flaky"):
            rs.submit(["p"], ["boom"]).result(timeout=10)


# ---------------------------------------------------------------------------
# device rewards


def test_device_reward_jitted_and_combined():
    import jax
    import jax.numpy as jnp

    fn = get_reward("target_token(token_id=3)")
    assert is_device_reward(fn) and fn.reward_name == "target_token"
    ids = jnp.array([[3, 3, 1, 0], [1, 2, 0, 0], [3, 1, 3, 3]], dtype=jnp.int32)
    mask = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=jnp.int32)  # last 3 is padding
    np.testing.assert_allclose(jax.jit(fn)(ids, mask), [2 / 3, 0.0, 2 / 3], rtol=1e-6)
    presence = jax.jit(get_reward("target_token(token_id=3, mode='presence')"))
    np.testing.assert_allclose(presence(ids, mask), [1.0, 0.0, 1.0])

    with RewardSet(["format", "target_token(token_id=3)"], weights=[1.0, 3.0], num_workers=0) as rs:
        assert rs.host_index == [0] and rs.device_index == [1]
        device = jax.jit(rs.device_fn())(ids, mask)
        assert device.shape == (3, 1) and device.dtype == jnp.float32
        comps = [GOOD, "x", "y"]
        from_values = rs(["p"] * 3, comps, device_values=device)
        from_ids = rs(["p"] * 3, comps, completion_ids=ids, completion_mask=mask)
        with pytest.raises(RewardError, match="need device_values or completion_ids"):
            rs(["p"] * 3, comps)
    np.testing.assert_allclose(from_values.total, [3.0, 0.0, 2.0], rtol=1e-6)
    np.testing.assert_allclose(from_ids.rewards, from_values.rewards)
