"""What each command prints, with an example: shown by ``rapbot COMMAND --help``.

Keyed by the command's words (``"eval cir"``). A command whose module already writes its own
``description`` keeps it; what it leaves out is added from here. Every command must have an
entry here or say both itself: a test runs ``--help`` of every command.
"""

from __future__ import annotations

import argparse
import textwrap

GUIDE: dict[str, tuple[str, str]] = {
    "remember": (
        "the reply (the concept's photos so far) and the remembered crop x1,y1,x2,y2;"
        " --json: the concept (id, name, description, category, box, examples)",
        'rapbot remember photos/mochi.jpg Mochi --desc "my grey cat" --box 40,60,380,420',
    ),
    "concepts": (
        "the chat's concepts with their descriptions and photo counts; --json: name,"
        " description, examples, owner of each. Reads the store only (no model loads)",
        "rapbot --chat tg:-100123 concepts --json",
    ),
    "rename": ("Renamed OLD to NEW. (store only)", 'rapbot rename Mochi "Mochi-san"'),
    "describe": ("Updated: NAME — description. (store only)", 'rapbot describe Mochi "my cat"'),
    "forget": (
        "I've forgotten NAME and all photos of them. (store only; owner or --admin)",
        "rapbot forget Mochi",
    ),
    "forget-user": (
        "how many concepts of USER were forgotten, in every chat; their indexed photos go"
        " too, and the web chat's kept photo files of a web:NAME user (store only: works"
        " without the models, a privacy request); --json: forgotten, files_deleted",
        "rapbot forget-user tg:42",
    ),
    "who": (
        "who and what is where in the photo; --out saves the photo with named boxes;"
        " --json: answer and concepts (name, score, box)",
        "rapbot who party.jpg --out party-named.jpg",
    ),
    "ask": (
        "the answer (about the photo if one is given, else about the remembered names);"
        " --json: answer and the concepts used",
        'rapbot ask party.jpg "is Mochi here?"',
    ),
    "caption": ("a one-line caption that uses the known names", "rapbot caption party.jpg"),
    "index": (
        "how many photos were indexed; a bad file is named on stderr, the others indexed,"
        " exit 1; a progress bar on a terminal; --json: photo_id and source of each",
        "rapbot index photos/*.jpg",
    ),
    "search": (
        "one line per photo, best first: score and source; --json: results",
        'rapbot search "Mochi on the sofa" -k 5   (or --ref photo.jpg "but at the beach")',
    ),
    "export": (
        "what was written: concepts, their photos, the search history, chats; a progress"
        " bar on a terminal",
        "rapbot export --chat tg:-100123 --out chat.zip   (--all: every chat, a backup)",
    ),
    "import": (
        "what was added, merged, skipped or left out, and whether it was re-embedded; a"
        " progress bar per stage (embedding again, importing) on a terminal",
        "rapbot import chat.zip --chat tg:-100456",
    ),
    "chat": (
        "the bot's replies as in a group chat; annotated photos are saved under the data"
        " folder's chat-photos/ (or --out-dir) and their paths printed",
        "rapbot chat   then: /remember Mochi | my grey cat < photos/mochi.jpg",
    ),
    "serve": (
        "logs (RAPBOT_LOG_FORMAT); a malformed or refused token is one line, exit 1",
        "TELEGRAM_BOT_TOKEN=... rapbot serve telegram --gateway celery",
    ),
    "worker": (
        "Celery's worker log; with several GPUs, one worker process per GPU",
        "rapbot worker --queues gpu --device cuda:0",
    ),
    "doctor": (
        "one line per check (ok / problem / skipped) with how to fix it; exit 1 on a problem",
        "rapbot doctor --role bot --online",
    ),
    "config": (
        "every setting in effect as VARIABLE=value, secrets hidden; --table: Markdown tables",
        "rapbot --config rapbot.env config --json",
    ),
    "models": ("see `rapbot models convert --help`", "rapbot models convert ckpt/ out/"),
    "models convert": (
        "the converted folder, to use as RAPBOT_GENERATOR",
        "rapbot models convert RAP-LLaVA/ rap-llava-hf/",
    ),
    "train": ("see `rapbot train rap --help`, `rapbot train cir --help`", "rapbot train rap"),
    "train rap": (
        "a progress bar (steps, loss, ETA) on stderr, then the step reached, the adapter's"
        " folder and the last loss",
        "rapbot train rap --data rap.json --base tiny-llava --out runs/rap --max-steps 100",
    ),
    "train cir": (
        "a progress bar on stderr, then the step reached, the encoder's folder and last loss",
        "rapbot train cir --data cirr.json --base tiny-llava --out runs/cir --steps 200",
    ),
    "eval": ("see `rapbot eval rap --help`, `rapbot eval cir --help`", "rapbot eval cir"),
    "eval rap": (
        "a table per task: caption recall/precision, visual and text QA accuracy,"
        " recognition precision/recall/F1 (weighted as RAP); a progress bar on a terminal;"
        " --json: the scores",
        "rapbot eval rap evalset.json --generator tiny-llava --limit 20",
    ),
    "eval cir": (
        "Recall@1/5/10/50 and Recall_subset@1/2/3 (CIRR), Recall@10/50 per category and"
        " average (FashionIQ), mAP@5/10/25/50 (CIRCO); a progress bar per set on a"
        " terminal; --json: the metrics",
        "rapbot eval cir cirr_val.json --gallery cirr_val_split.json --encoder runs/cir",
    ),
    "calibrate": (
        "precision, recall and 'nobody' accuracy per threshold, and the threshold saved",
        "rapbot calibrate photos/dataset",
    ),
    "web": (
        "the address to open (http://127.0.0.1:PORT), then request logs",
        "rapbot web --user ada --port 8765",
    ),
}


def commands(parser: argparse.ArgumentParser, prefix: str = ""):
    """``(words, parser, one-line help)`` of every command and subcommand under ``parser``."""
    for action in parser._actions:  # argparse keeps subparsers and their help only here
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, child in action.choices.items():
                words = f"{prefix}{name}"
                yield words, child, helps.get(name) or ""
                yield from commands(child, words + " ")


def explain(parser: argparse.ArgumentParser) -> None:
    """Give every command's --help what it does, what it prints and an example."""
    for words, child, summary in commands(parser):
        prints, example = GUIDE.get(words, (None, None))
        own = f"{child.description or ''} {child.epilog or ''}".lower()
        extra = []
        if prints and "print" not in own:
            extra.append(textwrap.fill(f"prints: {prints}", 79, subsequent_indent="  "))
        if example and "example" not in own:
            extra.append(f"example:\n  {example}")
        if child.description is None:
            child.description = summary[:1].upper() + summary[1:] + "." if summary else None
            child.formatter_class = argparse.RawDescriptionHelpFormatter
        if extra:
            child.epilog = "\n\n".join(filter(None, [child.epilog, *extra]))
