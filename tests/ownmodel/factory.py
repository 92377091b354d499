"""A user's own model, built in the test (no downloads): a byte-level BPE tokenizer with a
ChatML chat template, a tiny Qwen2 taught to answer, and DAPO-format data files.

The tokenizer is shaped like Qwen2.5's: eos is `<|endoftext|>`, a chat turn ends with
`<|im_end|>`, and generation_config.json lists several eos ids, one of them (`<|eot|>`)
named nowhere else. The model is a random tiny Qwen2 set to reply "Answer: 7" or
"Answer: 3" (half each) and end its turn with `<|im_end|>`, so groups on a problem whose
answer is 7 carry a learning signal and groups on any other problem do not.
"""

from __future__ import annotations

import json
import os

import torch

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|eot|>"]
VOCAB = 384  # the model's vocab: the tokenizer's 300-odd tokens, padded like Qwen's
QUESTIONS = ["What is 3 + 4?", "What is 10 - 3?", "What is 1 + 2?", "What is 21 / 3?",
             "How many days are in a week?", "What is 5 + 2?", "What is 2 + 1?", "What is 9 - 2?"]


def build_tokenizer(out_dir: str):
    """Train a byte-level BPE on DAPO-style text, wrap it as an HF fast tokenizer with the
    ChatML template, save it to `out_dir`; returns the loaded tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from dapo_megatron.data.templates import dapo_prompt

    corpus = [dapo_prompt(q) for q in QUESTIONS] + ["Answer: 7", "Answer: 3", "Answer: 999"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus * 10, trainers.BpeTrainer(
        vocab_size=360, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>")
    tok.chat_template = CHATML
    tok.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)


def token_id(tok, token: str) -> int:
    return int(tok.convert_tokens_to_ids(token))


def build_model(out_dir: str, tok, *, seed: int = 0):
    """A tiny random Qwen2 (tests/convert/tiny.py's shape, untied, random qkv biases) that
    replies "Answer: 7" or "Answer: 3" with probability 1/2 each and then <|im_end|>;
    saved with the tokenizer and a generation_config.json listing several eos ids.

    The reply is set in the weights rather than trained (seconds of CPU instead of
    minutes): the reply tokens get large, orthogonal embeddings, so the last hidden state
    is dominated by the current token, and their lm_head rows make each one predict the
    next token of the reply (a bigram chain on top of the random transformer, which
    still adds its small part to every logit)."""
    import transformers as tf

    from tests.convert.tiny import tiny_config

    eos, im_end, eot = (token_id(tok, t) for t in ("<|endoftext|>", "<|im_end|>", "<|eot|>"))
    assert len(tok) <= VOCAB
    cfg = tiny_config("qwen2", vocab_size=VOCAB, tie_word_embeddings=False, bos_token_id=eos,
                      eos_token_id=eos, pad_token_id=eos, max_position_embeddings=256)
    torch.manual_seed(seed)
    model = tf.Qwen2ForCausalLM(cfg).eval()
    header = tok.apply_chat_template([{"role": "user", "content": "q"}],
                                     add_generation_prompt=True, tokenize=False)
    start = tok.encode(header, add_special_tokens=False)[-1]
    seven, three = (tok.encode(f"Answer: {a}", add_special_tokens=False) for a in "73")
    fork = next(i for i, (a, b) in enumerate(zip(seven, three)) if a != b)
    assert seven[:fork] == three[:fork] and len(seven) == len(three) == fork + 1
    chain = [start] + seven[:fork]  # each predicts the next; chain[-1] predicts 7 or 3
    assert len(set(chain + [seven[-1], three[-1]])) == len(chain) + 2, "reply tokens repeat"
    emb, head = model.model.embed_tokens.weight, model.lm_head.weight
    hidden, scale = emb.shape[1], 8.0
    assert hidden > len(chain) + 2  # one direction per reply token
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.1)
        for i, t in enumerate(chain + [seven[-1], three[-1]]):
            emb[t].zero_()
            emb[t, i] = scale  # an own direction; RMSNorm maps it to ~scale * unit vector
        nxt = {t: [n] for t, n in zip(chain, chain[1:] + [None])}
        nxt[chain[-1]] = [seven[-1], three[-1]]
        nxt[seven[-1]] = nxt[three[-1]] = [im_end]
        for i, t in enumerate(chain + [seven[-1], three[-1]]):
            for n in nxt[t]:
                head[n, i] = 2.0  # logit ~ 2 * scale = 16 above the rest
    model.generation_config = tf.GenerationConfig(bos_token_id=eos, eos_token_id=[im_end, eos, eot],
                                                  pad_token_id=eos)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return model


def write_data(data_dir: str) -> tuple[str, str]:
    """DAPO-Math-17K-format train jsonl (rows 0-1: answer 999, never given; rows 2-3: 7)
    and an AIME-style eval parquet; returns their paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dapo_megatron.data.templates import dapo_prompt

    os.makedirs(data_dir, exist_ok=True)
    train = os.path.join(data_dir, "dapo-math-17k.jsonl")
    answers = ["999", "999", "7", "7", "7", "7"]
    with open(train, "w", encoding="utf-8") as f:
        for i, (q, a) in enumerate(zip(QUESTIONS, answers)):
            f.write(json.dumps({
                "data_source": "math_dapo", "ability": "MATH",
                "prompt": [{"role": "user", "content": dapo_prompt(q)}],
                "reward_model": {"ground_truth": a, "style": "rule-lighteval/MATH_v2"},
                "extra_info": {"index": f"q{i}"}}) + "\n")
    evalset = os.path.join(data_dir, "aime-2024.parquet")
    rows = [("What is 3 + 4?", "7"), ("What is 1 + 2?", "3"), ("What is 5 + 2?", "7")]
    pq.write_table(pa.table({
        "id": [f"2024-{i}" for i in range(len(rows))],
        "question": [q for q, _ in rows],
        "prompt": [[{"role": "user", "content": q + " Put the answer in \\boxed{}."}] for q, _ in rows],
        "reward_model": [{"ground_truth": a, "style": "rule"} for _, a in rows],
        "data_source": ["aime-2024"] * len(rows),
    }), evalset)
    return train, evalset
