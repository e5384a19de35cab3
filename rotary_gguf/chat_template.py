"""Chat templates: the model's own Hugging Face style jinja template, run in a sandbox."""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Sequence

from .errors import PromptError


def render_chat_template(template: str, messages: Sequence[dict], *, add_generation_prompt: bool = True,
                         **variables) -> str:
    """Apply a Hugging Face style jinja chat template in a sandbox, by default with the generation prompt."""
    compiled = _compile_chat_template(template)
    try:
        return compiled.render(messages=list(messages), add_generation_prompt=add_generation_prompt, **variables)
    except Exception as e:  # the template is the model's code: any failure means it refused these messages
        raise PromptError(f"the model's chat template cannot render these messages: {e}") from None


@functools.lru_cache(maxsize=4)
def _compile_chat_template(template: str):
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise PromptError(f"the model's chat template does not parse: {e}") from None
