"""A task of your own in one file: train.py --task examples.lowercase:task (docs/own_task.md).

The reward is the share of the response's characters that are lowercase letters or spaces: dense and easy, so a
tiny random model learns it on a CPU in a minute (configs/cpu_quickstart.toml). Swap in your prompts and scorer.
"""
import random
import string


class task:
    prefill = ""  # optional: text the assistant turn starts with (scored as part of the response)

    @staticmethod
    def examples(split: str, source) -> list:
        """Examples: "question" is the user message, "level" the column of eval tables. split is "train" or "eval";
        source (tasks.Source: files, levels, per_level, seed) says what the run asked for: ignored here."""
        rng = random.Random(f"lowercase-{split}")
        words = ["knight", "knave", "island", "truth", "liar", "puzzle", "reason", "answer"]
        return [{"task": "lowercase", "id": f"{split}-{i}", "level": "all", "answer": "",
                 "question": f"Describe the {rng.choice(words)} in lowercase words ({i})."}
                for i in range(512 if split == "train" else 16)]

    @staticmethod
    def score(examples: list, responses: list) -> list:
        """One {"reward", "correct", "format_ok"} per response, in order; never raises, linear time."""
        out = []
        for response in responses:
            share = sum(c in string.ascii_lowercase + " " for c in response) / max(len(response), 1)
            out.append({"reward": share, "correct": share >= 0.9, "format_ok": len(response) > 0})
        return out
