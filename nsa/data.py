"""Training text that every Python installation carries, as bytes: the corpora, the byte tokenizer, the splits.

Two corpora, both under the Python Software Foundation License and read from the running interpreter, so nothing is
downloaded at run time and nothing beyond the standard library is installed:

- "pydoc": the topic texts of the Python Language Reference that `help()` shows (`pydoc_data.topics`), about
  0.5 MB of English prose with code examples.
- "stdlib": those topics followed by the source of the standard library's pure-Python modules (the `.py` files
  under `sysconfig.get_paths()["stdlib"]`, test suites and site-packages left out), about 12 MB: long files whose
  names are defined far from where they are used, which gives long-context attention something to find.

Tokens are bytes (0..255) plus one special, SEP = 256, between documents. The last `val_fraction` of the token
stream is the validation split; training crops never reach into it.
"""

from __future__ import annotations

import os
import sysconfig
from dataclasses import dataclass

import torch

SEP = 256
VOCAB_SIZE = 257
CORPORA = ("pydoc", "stdlib")
# Directories of the standard library that hold tests or third-party packages, not the library itself.
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def encode(text: str) -> list[int]:
    """UTF-8 bytes of `text` as token ids."""
    return list(text.encode("utf-8"))


def decode(tokens) -> str:
    """Token ids back to text; SEP becomes a blank line, invalid UTF-8 a replacement character."""
    return bytes(t if t < 256 else 10 for t in tokens).decode("utf-8", errors="replace")


def documents(corpus: str) -> list[bytes]:
    """The documents of `corpus` in a fixed order (topic name, then module path), as UTF-8 bytes."""
    if corpus not in CORPORA:
        raise ValueError(f"corpus must be one of {CORPORA}, got {corpus!r}")
    from pydoc_data.topics import topics

    docs = [topics[name].encode("utf-8") for name in sorted(topics)]
    if corpus == "stdlib":
        root = sysconfig.get_paths()["stdlib"]
        paths = []
        for folder, subdirs, files in os.walk(root):
            subdirs[:] = sorted(d for d in subdirs if d not in _SKIP_DIRS)
            paths += [os.path.join(folder, f) for f in sorted(files) if f.endswith(".py")]
        for path in sorted(paths, key=lambda p: os.path.relpath(p, root)):
            with open(path, "rb") as f:
                docs.append(f.read())
    return docs


@dataclass
class Splits:
    """The token stream cut in two: train [N_train] and val [N_val], int16 (ids up to SEP)."""

    train: torch.Tensor
    val: torch.Tensor
    corpus: str

    def describe(self) -> str:
        return f"corpus {self.corpus!r}: {len(self.train):,} training and {len(self.val):,} validation tokens"


def load(corpus: str, val_fraction: float = 0.05) -> Splits:
    """The corpus as one stream (documents joined by SEP), the last `val_fraction` held out for validation."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    docs = documents(corpus)
    # Bytes hold no 256: join with a placeholder byte, then write SEP at the known document ends.
    tokens = torch.frombuffer(bytearray(b"\0".join(docs) + b"\0"), dtype=torch.uint8).to(torch.int16)
    tokens[torch.tensor([len(d) + 1 for d in docs]).cumsum(0) - 1] = SEP
    cut = int(len(tokens) * (1 - val_fraction))
    return Splits(train=tokens[:cut].clone(), val=tokens[cut:].clone(), corpus=corpus)


def get_batch(data: torch.Tensor, batch_size: int, seqlen: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random crops of `data`: inputs x [B, T] and next-token targets y [B, T], int64 on the CPU.

    The crops depend only on `generator`, so seeding it per step makes a run resumable without saving any
    loader state.
    """
    if len(data) <= seqlen:
        raise ValueError(f"the split has {len(data)} tokens, too few for crops of {seqlen + 1}")
    starts = torch.randint(0, len(data) - seqlen, (batch_size,), generator=generator)
    crops = torch.stack([data[s : s + seqlen + 1] for s in starts.tolist()]).long()
    return crops[:, :-1], crops[:, 1:]
