"""The output vocabulary of a merge with a tokenizer setting (mergekit's `tokenizer_source` /
`tokenizer:`), and where each input's embedding row for every output token comes from.

The output tokenizer is the base's (`base`), one model's (`<model>`), or the base's plus every token
of the other models it lacks (`union`: plain tokens first, in model order, then added tokens), plus
any token named under `tokenizer.tokens`. Each input (base and models) is then given one row per
output token, and the method merges those rows as it merges any tensor:
  - a token the input has (and that is not `force`d) keeps the input's own row;
  - otherwise the token's default row: its `tokens:` source if one is given (a model's row for that
    token, a model's row for another token or id, or zeros); else the one model that has it; else
    the base's row when the base has it; else the mean of the rows of the inputs that have it;
    zeros when no input has it;
  - rows added by `pad_to_multiple_of` are the mean of the input's rows over the vocabulary.
These are mergekit's rules (mergekit/tokenizer/build.py and embed.py); the tokenizer itself is built
with transformers exactly as mergekit builds it, so the written vocabulary is the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dtm_fast.errors import DtmError

SOURCE_UNION, SOURCE_BASE = "union", "base"


@dataclass(frozen=True)
class TokenSource:
    """A `tokenizer.tokens` entry: the row a token takes where an input lacks it (or always, with force)."""

    kind: str  # "model" (that model's row of this token), "model_token" (its row of another token/id), "zero"
    model: Path | None = None
    token: str | None = None
    token_id: int | None = None
    force: bool = False


@dataclass(frozen=True)
class TokenizerSpec:
    """What the config asked for: the source and the per-token embedding sources."""

    source: str | Path  # "union", "base", or a model directory
    tokens: tuple[tuple[str, TokenSource], ...] = ()
    pad_to_multiple_of: int | None = None
    base: Path | None = None  # the config's base_model: the tokenizer base, and the donor of shared tokens


@dataclass(frozen=True)
class Vocabulary:
    """The output tokenizer, and for each input (base first, then models) its row of every output
    token: a row index of its own tensor, or -1 for "use the token's default"."""

    tokenizer: Any  # a transformers tokenizer, saved as the output's tokenizer files
    size: int  # rows of the output embeddings (the vocabulary, padded)
    tokens: int  # tokens in the output vocabulary
    rows: tuple[tuple[int, ...], ...]  # rows[input][token id] -> own row or -1
    forced: frozenset[int]  # token ids whose default replaces every input's own row
    defaults: dict[int, tuple]  # token id -> ("mean", ((input, row), ...)) | ("row", input, row) | ("zero",)


def _load_tokenizer(path: Path, where: str):
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(str(path), use_fast=True, local_files_only=True)
    except (OSError, ValueError) as error:
        raise DtmError(f"{where}: cannot load the tokenizer of {path} ({str(error).splitlines()[0]}); it needs "
                       "tokenizer.json or tokenizer.model beside config.json") from None


def _vocab_size(path: Path, fallback: int) -> int:
    from dtm_fast.io.checkpoint import load_json_object

    config = load_json_object(path / "config.json") if (path / "config.json").is_file() else {}
    value = config.get("vocab_size")
    return value if isinstance(value, int) and not isinstance(value, bool) else fallback


def _check_no_unused(path: Path, tokenizer, where: str) -> None:
    """mergekit strips tokens past a model's vocab_size from the base's BPE tokenizer; dtm refuses them."""
    vocab = tokenizer.get_vocab()
    size = _vocab_size(path, len(vocab))
    unused = sorted(tok for tok, idx in vocab.items() if idx >= size)
    if unused:
        raise DtmError(f"{where}: {path}'s tokenizer has {len(unused)} token(s) past its vocab_size {size} "
                       f"(e.g. {unused[0]!r}); remove them from its tokenizer first")


def _union(base_path: Path, base_tok, tokenizers: list[tuple[Path, Any]]):
    """The base tokenizer plus every token of the others it lacks (mergekit's build_union_tokenizer)."""
    import tempfile

    import transformers

    plain: dict[str, None] = {}
    added: dict[str, Any] = {}
    for path, tokenizer in tokenizers:
        size = _vocab_size(path, tokenizer.vocab_size)
        decoder = tokenizer.added_tokens_decoder
        added_contents = {info.content for info in decoder.values()}
        # by id: get_vocab()'s order is a hash map's, which would make the new tokens' ids vary run to run
        for token, index in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
            if index < size and token not in added_contents:
                plain.setdefault(token)
        for index, info in decoder.items():
            if index < size:
                added.setdefault(info.content, info)
    with tempfile.TemporaryDirectory() as scratch:  # a copy, so the base's tokenizer object stays as loaded
        base_tok.save_pretrained(scratch, legacy_format=False)
        result = transformers.AutoTokenizer.from_pretrained(scratch, use_fast=True)
    base_vocab = base_tok.get_vocab()
    for token in plain:
        if token not in added and token not in base_vocab:
            result.add_tokens(token)
    for info in added.values():
        result.add_tokens(info)
    return result


def build_vocabulary(spec: TokenizerSpec, inputs: list[Path], where: str) -> Vocabulary:
    """The output tokenizer and every input's row of each output token. The tokenizer base is the
    config's base_model, else the first input (mergekit takes an arbitrary one then)."""
    tokenizer_base = spec.base if spec.base is not None else inputs[0]
    base_tok = _load_tokenizer(tokenizer_base, where)
    _check_no_unused(tokenizer_base, base_tok, where)
    tokenizers = [(tokenizer_base, base_tok)]
    for path in inputs:
        if path.resolve() != tokenizer_base.resolve() and all(path.resolve() != p.resolve() for p, _ in tokenizers):
            tokenizers.append((path, _load_tokenizer(path, where)))
    if spec.source == SOURCE_BASE:
        out = base_tok
    elif spec.source == SOURCE_UNION:
        out = _union(tokenizer_base, base_tok, tokenizers)
    else:
        out = _load_tokenizer(Path(spec.source), f"{where}: tokenizer source")
    present = set(out.get_vocab())
    for token, _ in spec.tokens:  # tokens the config names are added to the output vocabulary
        if token not in present:
            out.add_tokens(token)
            present.add(token)
    vocab = out.get_vocab()
    vocabs = {p.resolve(): t.get_vocab() for p, t in tokenizers}
    rows = []
    for path in inputs:
        own = vocabs[path.resolve()]
        size = _vocab_size(path, len(own))
        row = [-1] * len(vocab)
        for token, index in vocab.items():
            original = own.get(token, -1)
            row[index] = original if 0 <= original < size else -1
        rows.append(tuple(row))
    size = len(vocab)
    if spec.pad_to_multiple_of and size % spec.pad_to_multiple_of:
        size += spec.pad_to_multiple_of - size % spec.pad_to_multiple_of
    base = next((i for i, p in enumerate(inputs) if spec.base is not None and p.resolve() == spec.base.resolve()), None)
    forced, defaults = _defaults(spec, base, inputs, vocab, rows, vocabs, where)
    return Vocabulary(out, size, len(vocab), tuple(rows), forced, defaults)


def _input_index(model: Path, inputs: list[Path], where: str) -> int:
    for index, path in enumerate(inputs):
        if path.resolve() == model.resolve():
            return index
    raise DtmError(f"{where}: tokenizer.tokens names {model}, which is not one of the merged models; name a model "
                   "of the merge")


def _defaults(spec: TokenizerSpec, base: int | None, inputs: list[Path], vocab: dict[str, int],
              rows: list[tuple[int, ...]], vocabs: dict, where: str) -> tuple[frozenset[int], dict[int, tuple]]:
    configured = dict(spec.tokens)
    forced = frozenset(vocab[token] for token, source in configured.items() if source.force)
    defaults: dict[int, tuple] = {}
    for token, index in vocab.items():
        having = [i for i in range(len(inputs)) if rows[i][index] >= 0]
        source = configured.get(token)
        if (source is None or not source.force) and len(having) == len(inputs):
            continue  # every input has its own row
        if source is not None:
            defaults[index] = _configured(token, index, source, inputs, rows, vocabs, where)
        elif len(having) == 1:
            defaults[index] = ("row", having[0], rows[having[0]][index])
        elif not having:
            defaults[index] = ("zero",)
        elif base is not None and rows[base][index] >= 0:
            defaults[index] = ("row", base, rows[base][index])
        else:
            defaults[index] = ("mean", tuple((i, rows[i][index]) for i in having))
    return forced, defaults


def _configured(token: str, index: int, source: TokenSource, inputs: list[Path], rows, vocabs, where: str) -> tuple:
    if source.kind == "zero":
        return ("zero",)
    model = _input_index(source.model, inputs, f"{where}: tokenizer.tokens[{token!r}]")
    if source.kind == "model":
        if rows[model][index] < 0:
            raise DtmError(f"{where}: tokenizer.tokens[{token!r}] takes its row from {source.model}, which has no "
                           f"token {token!r}; name a model that has it, or a token of that model (token: or token_id:)")
        return ("row", model, rows[model][index])
    row = source.token_id
    if row is None:
        row = vocabs[inputs[model].resolve()].get(source.token)
        if row is None:
            raise DtmError(f"{where}: tokenizer.tokens[{token!r}]: {source.model} has no token {source.token!r}; "
                           "name a token of that model")
    return ("row", model, row)


def read_tokenizer_spec(value: Any, resolve, base: Path | None, where: str) -> TokenizerSpec:
    """mergekit's `tokenizer:` mapping (source, tokens, pad_to_multiple_of); `resolve(name, where)`
    turns a model reference into a directory."""
    if not isinstance(value, dict):
        raise DtmError(f"{where}: 'tokenizer' must be a mapping with source, tokens, pad_to_multiple_of")
    unknown = sorted(map(str, set(value) - {"source", "tokens", "pad_to_multiple_of"}))
    if unknown:
        raise DtmError(f"{where}: tokenizer: unknown key(s) {unknown} (it holds source, tokens, pad_to_multiple_of)")
    source = read_source(value.get("source", SOURCE_UNION), resolve, f"{where}: tokenizer.source")
    pad = value.get("pad_to_multiple_of")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
        raise DtmError(f"{where}: tokenizer.pad_to_multiple_of must be a positive whole number, got {pad!r}")
    tokens = value.get("tokens") or {}
    if not isinstance(tokens, dict):
        raise DtmError(f"{where}: tokenizer.tokens must map token text to {{source: ..., force: ...}}")
    read = tuple((str(token), _token_source(entry, resolve, f"{where}: tokenizer.tokens[{token!r}]"))
                 for token, entry in tokens.items())
    return TokenizerSpec(source, read, pad, base)


def read_source(value: Any, resolve, where: str) -> str | Path:
    if value in (SOURCE_UNION, SOURCE_BASE):
        return value
    if not isinstance(value, str) or not value:
        raise DtmError(f"{where}: expected union, base or a model, got {value!r}")
    return resolve(value, where)


def _token_source(entry: Any, resolve, where: str) -> TokenSource:
    if not isinstance(entry, dict) or set(entry) - {"source", "force"}:
        raise DtmError(f"{where}: expected a mapping with source (and optionally force)")
    force = entry.get("force", False)
    if not isinstance(force, bool):
        raise DtmError(f"{where}: force must be true or false, got {force!r}")
    source = entry.get("source")
    if isinstance(source, str):
        return TokenSource("model", resolve(source, where), force=force)
    if isinstance(source, dict) and source.get("kind") == "zero" and set(source) == {"kind"}:
        return TokenSource("zero", force=force)
    if isinstance(source, dict) and source.get("kind") == "model_token" and "model" in source \
            and not set(source) - {"kind", "model", "token", "token_id"} \
            and (("token" in source) != ("token_id" in source)):
        token_id = source.get("token_id")
        if token_id is not None and (isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0):
            raise DtmError(f"{where}: token_id must be a whole number >= 0, got {token_id!r}")
        return TokenSource("model_token", resolve(source["model"], where), source.get("token"), token_id, force)
    raise DtmError(f"{where}: source must be a model, {{kind: zero}} or {{kind: model_token, model: ..., token: ...}} "
                   "(or token_id: instead of token)")
