"""TRL preference rows: `{"prompt": [messages], "chosen": [assistant message], "rejected": [...], "images"?: [...]}`.

The prompt is read as `prompt_completion` reads it (string or messages, typed parts, `{"type": "image"}` parts take
the row's `images` in order, untagged images go first in the first user message); `chosen` and `rejected` are each
one assistant message, or a string. The prompt must end with the user's message: the replies answer it.
"""

from __future__ import annotations

from ..conversation import ConversationPair
from . import prompt_completion
from .common import Options, Resolve, RowError, label

REQUIRED = ("prompt", "chosen", "rejected")
OPTIONAL = ("images", "image")  # TRL: a list of images, or one image
SIDES = ("chosen", "rejected")


def read(row: dict, resolve: Resolve, options: Options) -> ConversationPair:
    if row.get("prompt") is None:
        raise RowError(f'missing {label(row, "prompt")}: a preference row is {{"prompt": [{{"role": "user", '
                       '"content": ...}], "chosen": [{"role": "assistant", "content": ...}], "rejected": [...]}; '
                       "TRL's implicit-prompt form (whole conversations in chosen and rejected) is not read: "
                       'move the shared turns into "prompt"')
    _check_prompt_end(row)
    for side in SIDES:
        value = row.get(side)
        if isinstance(value, list) and len(value) > 1:
            raise RowError(f"{label(row, side)} holds {len(value)} messages; it must be the one assistant reply to "
                           'the prompt (earlier turns belong in "prompt")')
    convs = {side: prompt_completion.read(row, resolve, options, completion_key=side) for side in SIDES}
    return pair_of(row, convs)


def pair_of(row: dict, convs: dict) -> ConversationPair:
    """The two read conversations (prompt + one reply each) as a pair; RowError when the replies are the same."""
    chosen, rejected = convs["chosen"], convs["rejected"]
    if chosen.turns[:-1] != rejected.turns[:-1]:  # both were read from the same prompt fields
        raise RowError("the prompt reads differently beside the two replies; please report this row")
    if chosen.turns[-1].text.strip() == rejected.turns[-1].text.strip():
        raise RowError(f"{label(row, 'chosen')} and {label(row, 'rejected')} are the same reply, so there is "
                       "nothing to prefer; fix the row or leave it out")
    return ConversationPair(chosen.turns[:-1], chosen.turns[-1], rejected.turns[-1])


def _check_prompt_end(row: dict) -> None:
    prompt = row["prompt"]
    if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict) and prompt[-1].get("role") == "assistant":
        raise RowError(f"prompt message {len(prompt) - 1}: the prompt ends with an assistant turn; it must end with "
                       'the user\'s message that "chosen" and "rejected" answer (an assistant prefix of the reply '
                       "belongs in both replies)")
