"""The project's tokenizer: a byte-level BPE trained with `tokenizers` on the corpus's train split.

It is wrapped as a `transformers.PreTrainedTokenizerFast` (one special token, `<|endoftext|>`,
used as eos, bos and pad, as in GPT-2), saved and loaded with the usual `save_pretrained` /
`from_pretrained`. Training is deterministic for a given text list and vocabulary size.

Also here: encoding a list of documents into one 1-D token stream (eos after every document) and
cutting that stream into `[B, T]` language-model batches.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
DEFAULT_VOCAB_SIZE = 8192
MIN_VOCAB_SIZE = 257  # 256 byte symbols + eos


def train_tokenizer(texts: list[str], vocab_size: int = DEFAULT_VOCAB_SIZE,
                    min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` (deterministic) and wrap it for transformers."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be >= {MIN_VOCAB_SIZE} (256 bytes + eos), got {vocab_size}")
    if not texts or not any(texts):
        raise ValueError("train_tokenizer needs at least one non-empty text")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer, length=len(texts))
    return wrap_tokenizer(bpe)


def wrap_tokenizer(bpe: Tokenizer) -> PreTrainedTokenizerFast:
    """A `tokenizers.Tokenizer` as a transformers fast tokenizer with GPT-2's special tokens."""
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=1 << 30,  # documents are encoded whole and cut into windows later
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: str | os.PathLike) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(directory))
    return directory


def load_tokenizer(directory: str | os.PathLike) -> PreTrainedTokenizerFast:
    """Load a tokenizer saved by `save_tokenizer` (clear error when the directory lacks one)."""
    directory = Path(directory)
    if not (directory / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {directory}; train one with nectar.train.tokenizer.train_tokenizer")
    return PreTrainedTokenizerFast.from_pretrained(str(directory))


def encode_documents(tokenizer: PreTrainedTokenizerFast, documents: list[str],
                     append_eos: bool = True) -> torch.Tensor:
    """One 1-D LongTensor [N] of token ids: each document's ids followed by eos."""
    if not documents:
        raise ValueError("encode_documents needs at least one document")
    encodings = tokenizer.backend_tokenizer.encode_batch(documents, add_special_tokens=False)
    eos = [tokenizer.eos_token_id] if append_eos else []
    ids = [token for enc in encodings for token in (*enc.ids, *eos)]
    return torch.tensor(ids, dtype=torch.long)  # [N]


def cut_sequences(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Cut a 1-D stream into consecutive non-overlapping rows [S, seq_len] (the tail is dropped)."""
    if ids.dim() != 1:
        raise ValueError(f"ids must be 1-D, got shape {list(ids.shape)}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (a language model predicts token t+1 from t), got {seq_len}")
    rows = ids.numel() // seq_len
    if rows == 0:
        raise ValueError(f"{ids.numel()} tokens are fewer than one sequence of {seq_len}")
    return ids[: rows * seq_len].view(rows, seq_len)  # [S, T]


def cut_batches(ids: torch.Tensor, batch_size: int, seq_len: int) -> torch.Tensor:
    """All full [B, T] batches of the stream, in order: [num_batches, B, T]."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sequences = cut_sequences(ids, seq_len)  # [S, T]
    num_batches = sequences.shape[0] // batch_size
    if num_batches == 0:
        raise ValueError(f"{sequences.shape[0]} sequences of {seq_len} tokens do not fill one batch of {batch_size}")
    return sequences[: num_batches * batch_size].view(num_batches, batch_size, seq_len)  # [N_b, B, T]


def iter_batches(ids: torch.Tensor, batch_size: int, seq_len: int, seed: int | None = 0,
                 epochs: int | None = None, skip: int = 0) -> Iterator[torch.Tensor]:
    """Yield [B, T] batches of random rows (a fresh permutation per epoch; `seed=None`: in order).

    `skip` batches are passed over without being built (a later stage continues the same seeded
    stream where an earlier one stopped). With `epochs=None` the iterator never ends; training
    loops stop it after their step count.
    """
    sequences = cut_sequences(ids, seq_len)  # [S, T]
    if sequences.shape[0] < batch_size:
        raise ValueError(f"{sequences.shape[0]} sequences of {seq_len} tokens do not fill one batch of {batch_size}")
    if skip < 0:
        raise ValueError(f"skip must be >= 0, got {skip}")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    per_epoch = sequences.shape[0] // batch_size
    epoch = 0
    while epochs is None or epoch < epochs:
        order = (torch.randperm(sequences.shape[0], generator=generator) if generator is not None
                 else torch.arange(sequences.shape[0]))
        for b in range(per_epoch):
            if skip > 0:
                skip -= 1
                continue
            yield sequences[order[b * batch_size:(b + 1) * batch_size]]  # [B, T]
        epoch += 1
