"""Child process that runs math-verify for `grpo_jax.rewards.math`.

Started as a script (``python _mv_worker.py [address_space_limit_bytes]``), it
does not import grpo_jax. Protocol, one JSON object per line:
the child first writes ``{"ready": true}`` (or ``{"ready": false, "error": ...}``);
then for each request ``{"pred": str, "ref": str, "timeout": int}`` on stdin it
answers ``{"ok": true | false | null}`` (null: math-verify could not decide).

Running here, math-verify works in this process's main thread, so its own
SIGALRM timeouts apply; the parent also kills the child when an answer is late
(big-integer arithmetic in C ignores signals), and an address-space limit turns
a runaway allocation (``10^{10^{10}}``) into a MemoryError.
"""

import os
import sys

# Run by path, Python put this folder first on sys.path; its modules (math.py, ...)
# would shadow the standard library for math-verify and sympy.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import json  # noqa: E402
import logging  # noqa: E402


def main() -> None:
    # The protocol owns the real stdout; anything a library prints goes to stderr.
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(obj) -> None:
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    limit = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    if limit > 0:
        try:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        except Exception:  # not on this platform: the parent's kill still bounds time
            pass
    logging.disable(logging.WARNING)
    try:
        from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

        config = [LatexExtractionConfig(), ExprExtractionConfig()]
    except Exception as e:  # noqa: BLE001
        send({"ready": False, "error": f"{type(e).__name__}: {e}"})
        return
    send({"ready": True})
    for line in sys.stdin:
        try:
            req = json.loads(line)
            timeout = req.get("timeout") or None
            gold = parse("\\boxed{" + req["ref"] + "}", extraction_config=config, parsing_timeout=timeout)
            answer = parse("\\boxed{" + req["pred"] + "}", extraction_config=config, parsing_timeout=timeout)
            ok = bool(verify(gold, answer, timeout_seconds=timeout)) if gold and answer else None
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException:  # noqa: BLE001 - math-verify's TimeoutException is a BaseException
            ok = None
        send({"ok": ok})


if __name__ == "__main__":
    main()
