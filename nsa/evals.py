"""Long-context retrieval for a byte-level language model: passkey retrieval and multi-query associative recall.

Both tasks are plain text, so a model trained only on the corpus can answer them by copying (what induction heads
do): nothing task-specific is trained. Each sample is scored teacher-forced, in one forward pass: an answer token
counts as right when the model's argmax at the position before it is that token. A sample whose answer tokens are all
right is exactly one that greedy decoding would answer right.

- Passkey (needle in a haystack): held-out text of the requested length with "The pass key is 48213. Remember it."
  inserted at a depth spread evenly over the samples, ending with "What is the pass key? The pass key is 48213". The
  answer is the final five digits.
- Multi-query associative recall (MQAR, as in Zoology): "key:value" pairs with three-letter keys and two-digit values,
  "qhe:42 bxt:07 ...", followed by queries of earlier keys ("bxt:07 ..."); the answers are the queried values.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import torch

from .data import encode


@dataclass
class Task:
    """Samples of one task at one length: tokens [N, T], answer positions [N, A] and answer tokens [N, A]."""

    tokens: torch.Tensor
    positions: torch.Tensor
    answers: torch.Tensor


def passkey(filler: torch.Tensor, length: int, num_samples: int, generator: torch.Generator) -> Task:
    """Passkey samples of exactly `length` tokens; the haystack is a random crop of `filler` [N_filler] (held-out
    text, repeated where it is shorter than the haystack)."""
    tokens, positions, answers = [], [], []
    for i in range(num_samples):
        key = "".join(str(d) for d in torch.randint(0, 10, (5,), generator=generator).tolist())
        needle = encode(f" The pass key is {key}. Remember it. ")
        question = encode(f" What is the pass key? The pass key is {key}")
        hay_len = length - len(needle) - len(question)
        if hay_len < 1:
            raise ValueError(f"length {length} leaves no room for the haystack")
        reps = -(-(hay_len + 1) // len(filler)) + 1
        start = int(torch.randint(0, len(filler), (1,), generator=generator))
        hay = filler.repeat(reps)[start : start + hay_len].tolist()
        depth = int(hay_len * (i + 0.5) / num_samples)
        sample = hay[:depth] + needle + hay[depth:] + question
        tokens.append(sample)
        positions.append(list(range(length - 5, length)))
        answers.append(sample[-5:])
    return Task(torch.tensor(tokens), torch.tensor(positions), torch.tensor(answers))


def mqar(length: int, num_samples: int, generator: torch.Generator, num_queries: int | None = None) -> Task:
    """MQAR samples of exactly `length` tokens: key-value pairs, then `num_queries` queries (default length // 32,
    at least 4) of distinct earlier keys. Every pair and query is 7 tokens, "abc:12 "; the answers are the digits."""
    num_queries = num_queries or max(4, length // 32)
    num_pairs = (length - 7 * num_queries) // 7
    if num_pairs < num_queries:
        raise ValueError(f"length {length} is too short for {num_queries} queries")
    letters = string.ascii_lowercase
    tokens, positions, answers = [], [], []
    for _ in range(num_samples):
        # Distinct keys: a random draw without replacement from the 26^3 three-letter words.
        codes = torch.randperm(26**3, generator=generator)[:num_pairs].tolist()
        keys = [letters[c // 676] + letters[c // 26 % 26] + letters[c % 26] for c in codes]
        values = [f"{v:02d}" for v in torch.randint(0, 100, (num_pairs,), generator=generator).tolist()]
        asked = torch.randperm(num_pairs, generator=generator)[:num_queries].tolist()
        pad = length - 7 * (num_pairs + num_queries)
        text = " " * pad + "".join(f"{k}:{v} " for k, v in zip(keys, values))
        text += "".join(f"{keys[j]}:{values[j]} " for j in asked)
        sample = encode(text)
        first = length - 7 * num_queries
        pos = [first + 7 * q + 4 + d for q in range(num_queries) for d in range(2)]
        tokens.append(sample)
        positions.append(pos)
        answers.append([sample[p] for p in pos])
    return Task(torch.tensor(tokens), torch.tensor(positions), torch.tensor(answers))


@torch.no_grad()
def answer_correct(model, task: Task, batch_size: int = 1, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Whether the model's argmax predicts each answer token: bool [N, A]."""
    device = next(model.parameters()).device
    correct = []
    for i in range(0, len(task.tokens), batch_size):
        x = task.tokens[i : i + batch_size].to(device)
        # The prediction of the token at position p is made at p - 1.
        pos = (task.positions[i : i + batch_size] - 1).to(device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            hidden = model.model(input_ids=x, use_cache=False).last_hidden_state
        hidden = hidden.gather(1, pos[..., None].expand(-1, -1, hidden.shape[-1]))
        pred = model.lm_head(hidden.to(model.lm_head.weight.dtype)).argmax(-1)
        correct.append((pred == task.answers[i : i + batch_size].to(device)).cpu())
    return torch.cat(correct)


def evaluate(model, filler: torch.Tensor, lengths: list[int], num_samples: int, seed: int = 0,
             autocast_dtype: torch.dtype | None = None, tokens_per_batch: int = 32768) -> dict:
    """Passkey and MQAR accuracy at every length, on the same samples for every model given the same seed.

    Returns {"passkey": {length: {"accuracy", "digit_accuracy"}}, "mqar": {length: {"accuracy",
    "sample_accuracy"}}}: passkey accuracy is the share of samples with all five digits right; MQAR accuracy is the
    share of queried values (both digits) right, sample_accuracy the share of samples with every query right.
    """
    was_training = model.training
    model.eval()
    results = {"passkey": {}, "mqar": {}}
    for length in lengths:
        batch = max(1, tokens_per_batch // length)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + length)
        ok = answer_correct(model, passkey(filler, length, num_samples, gen), batch, autocast_dtype)
        results["passkey"][length] = {"accuracy": ok.all(1).float().mean().item(),
                                      "digit_accuracy": ok.float().mean().item()}
        ok = answer_correct(model, mqar(length, num_samples, gen), batch, autocast_dtype)
        per_query = ok.view(len(ok), -1, 2).all(-1)
        results["mqar"][length] = {"accuracy": per_query.float().mean().item(),
                                   "sample_accuracy": per_query.all(1).float().mean().item()}
    model.train(was_training)
    return results
