"""The ``dser`` command line: each command parses its arguments and calls one library function.

Errors a user can cause surface as one line (``Error: …``) and a non-zero exit, never a
traceback from deep inside a library.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from dser import __version__


class UserError(click.ClickException):
    """A mistake the user can fix; printed as one line."""


def _parse_kv(pairs: tuple[str, ...], what: str) -> dict[str, str]:
    out = {}
    for p in pairs:
        if "=" not in p:
            raise UserError(f"{what} {p!r} is not KEY=VALUE")
        k, v = p.split("=", 1)
        out[k.strip()] = v
    return out


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dser")
def main():
    """dser: parameter-efficient finetuning of speech foundation models for emotion recognition."""


@main.command()
@click.argument("corpus")
@click.argument("root", type=click.Path(path_type=Path))
@click.argument("out", required=False, type=click.Path(path_type=Path))
@click.option("--sample-rate", default=16000, show_default=True, help="Output sample rate (Hz).")
@click.option("--max-shard-mb", default=256.0, show_default=True, help="Start a new shard past this size.")
@click.option("--max-shard-samples", default=None, type=int, help="Start a new shard past this many samples.")
@click.option("--min-duration", default=0.25, show_default=True, help="Skip clips shorter than this (s).")
@click.option("--workers", default=1, show_default=True, help="Parallel encoding processes.")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT.")
@click.option("--strict", is_flag=True, help="Fail (non-zero exit) if any input is skipped.")
@click.option("--option", "reader_options", multiple=True, metavar="KEY=VALUE",
              help="Reader option, e.g. --option include_song=true for ravdess.")
def shard(corpus, root, out, sample_rate, max_shard_mb, max_shard_samples, min_duration, workers,
          overwrite, strict, reader_options):
    """Turn CORPUS at ROOT into WebDataset shards in OUT (default shards/CORPUS).

    CORPUS is one of iemocap, msp-podcast, crema-d, ravdess, emodb, manifest (ROOT is then a
    CSV or JSONL file).
    """
    from dser.corpora import CorpusError, read_corpus
    from dser.shards import ShardError, build_shards

    out = out or Path("shards") / corpus
    try:
        listing = read_corpus(corpus, root, **_parse_kv(reader_options, "--option"))
        build_shards(listing, out, corpus=corpus, root=root, sample_rate=sample_rate,
                     max_shard_mb=max_shard_mb, max_shard_samples=max_shard_samples,
                     min_duration=min_duration, workers=workers, overwrite=overwrite,
                     strict=strict)
    except (CorpusError, ShardError, TypeError, ValueError) as e:
        raise UserError(str(e)) from e


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--style", type=click.Choice(["acted", "natural"]), required=True)
@click.option("--utterances", default=800, show_default=True, help="Number of clips.")
@click.option("--speakers", default=10, show_default=True, help="Number of speakers.")
@click.option("--seed", default=0, show_default=True)
@click.option("--sample-rate", default=16000, show_default=True)
def synth(out, style, utterances, speakers, seed, sample_rate):
    """Generate a synthetic emotional-speech corpus (WAV + manifest.jsonl) in OUT."""
    from dser.corpora.synthetic import synthesize

    try:
        manifest = synthesize(out, style, utterances=utterances, speakers=speakers, seed=seed,
                              sample_rate=sample_rate)
    except ValueError as e:
        raise UserError(str(e)) from e
    click.echo(f"wrote {manifest}")


if __name__ == "__main__":
    sys.exit(main())
