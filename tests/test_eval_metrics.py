"""evaluate()'s length and truncation figures, against a hand-counted scripted engine."""

from dapo_megatron.config import load_config
from dapo_megatron.data.datasets import PromptExample
from dapo_megatron.data.templates import user_message
from dapo_megatron.data.tokenizer import CharTokenizer
from dapo_megatron.controller.eval_phase import evaluate
from dapo_megatron.reward import compute_score
from dapo_megatron.rollout.protocol import Sample


class ScriptedEngines:
    """Returns fixed responses, in two streamed chunks, whatever the prompts."""

    def __init__(self, tok, responses):  # responses[prompt] = [(text, finish_reason), ...]
        self.tok, self.responses = tok, responses

    def generate_streaming(self, prompt_ids, params, tag):
        for chunk in ([0], list(range(1, len(prompt_ids)))):
            yield chunk, [[Sample(self.tok.encode(text), [], reason, i, f"r{i}", j)
                           for j, (text, reason) in enumerate(self.responses[i])] for i in chunk]


class Scorer:
    def score(self, texts, refs):
        return [compute_score(t, r) for t, r in zip(texts, refs)]


def test_eval_reports_truncated_share_and_max_length():
    tok = CharTokenizer()
    examples = [PromptExample(messages=user_message(p), ground_truth=a, data_source="chains-heldout", index=i)
                for i, (p, a) in enumerate([("1+2=", "3"), ("5-1+4=", "8")])]
    responses = [
        [("1+2=3\nAnswer: 3", "stop"), ("1+2=3\ncheck 1+2=3\ncheck 1", "length")],
        [("5-1=4\n4+4=8\nAnswer: 8", "stop"), ("5-1=4\n4+4=9\nAnswer: 9", "stop")],
    ]
    cfg = load_config(None, ["eval.k=2"])
    m = evaluate(cfg, examples, tok, ScriptedEngines(tok, responses), Scorer(), k=2)
    lengths = [len(t) for group in responses for t, _ in group]
    assert m["eval/truncated_frac"] == 1 / 4
    assert m["eval/length_max"] == max(lengths) and m["eval/length_mean"] == sum(lengths) / 4
    assert m["eval/avg@k"] == (1 / 2 + 1 / 2) / 2 and m["eval/pass@k"] == 1.0
