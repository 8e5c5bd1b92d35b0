"""``papa-merge pull`` and ``papa-merge push``: checkpoints from and to the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("repo")
@click.option("--revision", default=None, help="Branch, tag, commit sha or refs/pr/N (or write REPO@revision).")
@click.option("--include", "include", multiple=True, metavar="GLOB",
              help="Fetch only files matching GLOB (repeat or comma-separate). [default: the weights the "
                   "checkpoint needs, its config/tokenizer files and README.md]")
@click.option("--exclude", "exclude", multiple=True, metavar="GLOB",
              help="Leave out files matching GLOB (repeat or comma-separate; matched against the path and the file "
                   "name), e.g. --exclude '*.bin'.")
@click.option("-o", "--out", default=None, type=click.Path(),
              help="Copy the files into this new folder. [default: leave them in huggingface_hub's cache and "
                   "print the folder]")
@click.option("--force", is_flag=True, help="Replace an existing, non-empty --out (only once the copy is complete).")
def pull(repo: str, revision: str | None, include: tuple[str, ...], exclude: tuple[str, ...], out: str | None,
         force: bool) -> None:
    """Download a checkpoint from the Hub.

    REPO is org/name[@revision].

    Downloads go through huggingface_hub's cache (HF_HOME); HF_ENDPOINT and HF_TOKEN are honoured.
    Any command that takes a checkpoint also takes hf://org/name[@revision] directly.

    \b
    Examples:
      papa-merge pull org/member-a
      papa-merge pull org/member-a@v2 --include '*.safetensors' -o members/a
      papa-merge pull org/llama-soup --exclude '*.bin' --exclude 'original/*'
      papa-merge soup hf://org/member-a hf://org/member-b@v2 -o soup/
    """
    import merge.hub

    from cli.util import show_progress

    folder = merge.hub.pull(repo, revision=revision, include=list(include) or None, exclude=list(exclude) or None,
                            out=out, force=force, progress=show_progress())
    ref, rev = merge.hub.parse_reference(repo)
    click.echo(f"pulled {ref}@{revision or rev or 'main'} to {folder}")


@click.command()
@click.argument("path", type=click.Path())
@click.argument("repo")
@click.option("--private", is_flag=True, help="Create the repo private (when it does not exist yet).")
@click.option("--revision", default=None, help="Branch to commit to (created from main if missing). [default: main]")
@click.option("--create-pr", is_flag=True, help="Open a pull request against main instead of committing to it.")
@click.option("--path-in-repo", default=None, metavar="NAME",
              help="Where the checkpoint goes in the repo. [default: model.safetensors for a file, the top of the "
                   "repo for a folder]")
@click.option("--keep-existing", is_flag=True,
              help="Keep the revision's other checkpoints beside this one (a file keeps its own name; the model "
                   "card lists them all). [default: delete them, so the revision holds exactly this checkpoint]")
@click.option("--exclude", "exclude", multiple=True, metavar="GLOB",
              help="Do not upload a folder's files matching GLOB (repeat or comma-separate; matched against the path "
                   "inside the folder and the file name), e.g. --exclude 'optimizer.pt'.")
@click.option("-m", "--message", "message", default=None, help="Commit message.")
@click.option("--dry-run", is_flag=True, help="Check the checkpoint and list what would be uploaded; send nothing.")
def push(path: str, repo: str, private: bool, revision: str | None, create_pr: bool, path_in_repo: str | None,
         keep_existing: bool, exclude: tuple[str, ...], message: str | None, dry_run: bool) -> None:
    """Upload a checkpoint to the Hub.

    PATH is a file or a model folder; afterwards the Hub repo REPO holds exactly it.

    Creates the repo if needed and makes one commit with the checkpoint and a model card (README.md)
    recording its recipe (method, members, weights, metrics) and how to load it. A single file is
    stored as model.safetensors, the name transformers and timm load; other weight files and shard
    indexes of the revision are deleted in the same commit, and listed. A folder's own README.md is
    uploaded as is (the card `soup` wrote is regenerated for the repo). Local files are never changed.
    HF_ENDPOINT and HF_TOKEN are honoured.

    \b
    Examples:
      papa-merge push soup.safetensors org/my-soup --private
      papa-merge push soup/ org/my-soup --create-pr
      papa-merge push soup/ org/my-soup --revision experiments -m "greedy soup of 8 seeds"
      papa-merge push greedy.safetensors org/soups --keep-existing
      papa-merge push run/ org/my-model --exclude 'optimizer.pt' --dry-run
    """
    if create_pr and revision not in (None, "main"):
        raise click.UsageError(f"--create-pr opens a pull request against main; drop --revision {revision}")
    import merge.hub

    from cli.util import show_progress

    result = merge.hub.push(path, repo, private=private, revision=revision, create_pr=create_pr,
                            commit_message=message, path_in_repo=path_in_repo, keep_existing=keep_existing,
                            exclude=list(exclude) or None, dry_run=dry_run, progress=show_progress())
    repo_id, rev = merge.hub.parse_reference(repo)
    where = f"{repo_id}@{'refs/pr' if create_pr else (revision or rev or 'main')}"
    if result.dry_run:
        click.echo(f"would push {path} to {where} ({len(result.uploaded)} files; dry run, nothing sent):")
        for name in result.uploaded:
            click.echo(f"  {name}")
        if not keep_existing:
            click.echo("  (and delete the other weight files and shard indexes of that folder in the repo)")
        return
    if result.deleted:
        click.echo(f"deleted from {where}: {', '.join(result.deleted)} (not part of the pushed checkpoint; "
                   "--keep-existing keeps them)")
    stored = f" as {result.checkpoint}" if Path(path).is_file() else ""
    click.echo(f"pushed {path}{stored} to {repo_id}: {result.url}")
