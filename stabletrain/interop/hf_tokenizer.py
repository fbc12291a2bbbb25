"""A sentencepiece model as a Hugging Face fast tokenizer (`AutoTokenizer` loads it, same ids).

Built with the `tokenizers` library from the model's own pieces: BPE with the merges ordered by piece score (or
Unigram with the scores), byte fallback, the dummy prefix "▁" only at the start of the text (sentencepiece does not
add one after a user-defined symbol such as "\\n"), control pieces (<unk>, <s>, </s>) as special tokens and
user-defined pieces as plain added tokens."""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

CONTROL, USER_DEFINED, UNKNOWN = 3, 4, 2  # sentencepiece piece types


def hf_tokenizer(spm_path: Path, max_length: int):
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import generate_merges, import_protobuf

    proto = import_protobuf().ModelProto()
    proto.ParseFromString(Path(spm_path).read_bytes())
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    spec = proto.trainer_spec
    if spec.model_type == 1:  # unigram
        model = models.Unigram([(p, s) for p, s, _ in pieces], unk_id=spec.unk_id, byte_fallback=spec.byte_fallback)
    else:
        vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
        model = models.BPE(
            vocab=vocab,
            merges=generate_merges(vocab),
            unk_token=pieces[spec.unk_id][0],
            fuse_unk=True,
            byte_fallback=spec.byte_fallback,
        )
    tk = Tokenizer(model)
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tk.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tk.add_special_tokens(
        [AddedToken(p, special=True, normalized=False) for p, _, t in pieces if t in (UNKNOWN, CONTROL)]
    )
    tk.add_tokens([AddedToken(p, special=False, normalized=False) for p, _, t in pieces if t == USER_DEFINED])

    def piece(i: int) -> str | None:
        return pieces[i][0] if 0 <= i < len(pieces) else None

    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        unk_token=piece(spec.unk_id),
        bos_token=piece(spec.bos_id),
        eos_token=piece(spec.eos_id),
        model_max_length=max_length,
    )
