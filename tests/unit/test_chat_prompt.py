"""Chat messages to prompt text: the model's own template, checked placeholders, length limit.

Rendering uses the tiny model's real processor (and an OpenCUA-template variant built into a
temporary directory), so the templates are the ones the worker serves. No engine here.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from tools.tiny_model import OPENCUA_IMAGE_SPAN, QWEN_IMAGE_SPAN

from support.jobs import mm_kwargs
from vlm_worker.contract.errors import PromptError, PromptTooLong
from vlm_worker.contract.job_schema import parse_job
from vlm_worker.engine.model_info import geometry_from, load_processor
from vlm_worker.media.geometry import ImageGeometry
from vlm_worker.prompt.chat import (
    MEDIA_SPAN,
    check_length,
    normalize_placeholders,
    render,
    template_messages,
)

PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
IMAGE_TOKEN = "<|image_pad|>"
DEFAULT_SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
GENERATION_PROMPT = "<|im_start|>assistant\n"
MEDIA_TOKENS = ("<|media_begin|>", "<|media_content|>", "<|media_pad|>", "<|media_end|>")
IMG = "data:image/png;base64,iVBORw0KGgo="


def messages(*raw: dict) -> list:
    """Parsed through the real job schema, as the worker does."""
    return list(parse_job({"messages": list(raw)}).messages)


def user(*parts: dict | str) -> dict:
    if len(parts) == 1 and isinstance(parts[0], str):
        return {"role": "user", "content": parts[0]}
    return {"role": "user", "content": list(parts)}


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def image_url() -> dict:
    return {"type": "image_url", "image_url": {"url": IMG}}


def image() -> dict:
    return {"type": "image", "image": "aGVsbG8="}


@pytest.fixture(scope="module")
def opencua_processor(tmp_path_factory):
    from tools.tiny_model import build_tiny_model

    path = build_tiny_model(tmp_path_factory.mktemp("models") / "opencua", template="opencua")
    return load_processor(str(path), None, False)


# ---------------------------------------------------------------- template_messages


def test_template_messages_shapes():
    msgs = messages(
        {"role": "system", "content": "Be terse."},
        user(image_url(), text("What is this?"), image()),
        {"role": "assistant", "content": [text("It is")]},
        user("plain string"),
    )
    assert template_messages(msgs) == [
        {"role": "system", "content": "Be terse."},
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": "What is this?"},
                {"type": "image"},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "It is"}]},
        {"role": "user", "content": "plain string"},
    ]


def test_template_messages_carry_no_image_data():
    msgs = messages(
        user({"type": "image_url", "image_url": {"url": IMG, "detail": "high"}}, image())
    )
    out = template_messages(msgs)
    assert out[0]["content"] == [{"type": "image"}, {"type": "image"}]
    assert "base64" not in repr(out) and "aGVsbG8" not in repr(out)


def test_template_messages_empty_parts_list():
    assert template_messages(messages(user())) == [{"role": "user", "content": []}]


# ---------------------------------------------------------------- render (qwen template)


def test_render_qwen_one_image(processor):
    rendered = render(
        processor, template_messages(messages(user(image_url(), text("Describe the screen."))))
    )
    assert rendered.startswith(DEFAULT_SYSTEM)
    assert rendered.count(PLACEHOLDER) == 1
    assert f"{PLACEHOLDER}Describe the screen.<|im_end|>" in rendered
    assert rendered.endswith(GENERATION_PROMPT)
    assert rendered == (
        DEFAULT_SYSTEM
        + "<|im_start|>user\n"
        + PLACEHOLDER
        + "Describe the screen.<|im_end|>\n"
        + GENERATION_PROMPT
    )


@pytest.mark.parametrize("n", [0, 1, 2, 3])
def test_render_one_placeholder_per_image(processor, n):
    parts = [image_url() if i % 2 else image() for i in range(n)] + [text("Compare.")]
    rendered = render(processor, template_messages(messages(user(*parts))))
    assert rendered.count(PLACEHOLDER) == n
    assert rendered.count(IMAGE_TOKEN) == n
    assert normalize_placeholders(rendered, n, PLACEHOLDER, IMAGE_TOKEN) == rendered


def test_render_custom_system_prompt_replaces_default(processor):
    rendered = render(
        processor,
        template_messages(messages({"role": "system", "content": "Be terse."}, user("hi"))),
    )
    assert "You are a helpful assistant." not in rendered
    assert rendered.startswith("<|im_start|>system\nBe terse.<|im_end|>\n")
    assert rendered.endswith("<|im_start|>user\nhi<|im_end|>\n" + GENERATION_PROMPT)


def test_render_with_the_tokenizer_gives_the_same_text(processor):
    msgs = template_messages(messages(user(image_url(), text("hi"))))
    assert render(processor.tokenizer, msgs) == render(processor, msgs)


@pytest.mark.parametrize("prefix", ["The button is at", "Sure", "(x, y) = ("])
def test_render_continues_a_final_assistant_message(processor, prefix):
    msgs = template_messages(
        messages(user(image_url(), text("Where?")), {"role": "assistant", "content": prefix})
    )
    rendered = render(processor, msgs)
    assert rendered.endswith(GENERATION_PROMPT + prefix)  # no new turn, not closed
    assert not rendered.endswith("<|im_end|>") and not rendered.endswith("<|im_end|>\n")
    assert rendered.count("<|im_start|>assistant") == 1
    assert rendered.count(PLACEHOLDER) == 1


def test_render_continues_assistant_parts(processor):
    msgs = template_messages(
        messages(user("Where?"), {"role": "assistant", "content": [text("At (")]})
    )
    assert render(processor, msgs).endswith(GENERATION_PROMPT + "At (")


def test_earlier_assistant_turns_are_closed(processor):
    msgs = template_messages(messages(user("a"), {"role": "assistant", "content": "b"}, user("c")))
    rendered = render(processor, msgs)
    assert "<|im_start|>assistant\nb<|im_end|>\n<|im_start|>user\nc<|im_end|>\n" in rendered
    assert rendered.endswith(GENERATION_PROMPT)


def test_render_uses_a_custom_chat_template(processor):
    template = (
        "{% for m in messages %}[{{ m['role'] }}]"
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
        "{% for p in m['content'] %}{% if p['type'] == 'image' %}<IMG>{% else %}{{ p['text'] }}"
        "{% endif %}{% endfor %}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    msgs = template_messages(messages(user(image_url(), text("hi"))))
    assert render(processor, msgs, chat_template=template) == "[user]<IMG>hi[assistant]"
    # None means the model's own template.
    assert render(processor, msgs, chat_template=None) == render(processor, msgs)


@pytest.mark.parametrize(
    ("template", "words"),
    [
        ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
        ("{% for %}", "could not render"),
        ("{{ messages[5]['content'] }}", "could not render"),
    ],
)
def test_template_errors_become_prompt_errors(processor, template, words):
    msgs = template_messages(messages(user("hi")))
    with pytest.raises(PromptError) as info:
        render(processor, msgs, chat_template=template)
    assert words in info.value.message
    assert info.value.message.startswith("the chat template could not render these messages")
    assert info.value.to_dict()["error"]["type"] == "prompt"
    assert info.value.__cause__ is not None


def test_template_returning_non_text_is_a_prompt_error():
    class Odd:
        def apply_chat_template(self, conversation, **kwargs):
            return [1, 2, 3]

    with pytest.raises(PromptError, match="returned list, not text"):
        render(Odd(), [{"role": "user", "content": "hi"}])


def test_render_passes_generation_flags():
    seen = {}

    class Spy:
        def apply_chat_template(self, conversation, **kwargs):
            seen.update(kwargs)
            return "ok"

    render(Spy(), [{"role": "user", "content": "hi"}], chat_template="T")
    assert seen == {
        "chat_template": "T",
        "tokenize": False,
        "add_generation_prompt": True,
        "continue_final_message": False,
    }
    render(Spy(), [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    assert seen["add_generation_prompt"] is False and seen["continue_final_message"] is True


# ---------------------------------------------------------------- normalize_placeholders


def test_placeholder_count_mismatch_names_both_counts():
    rendered = f"<|im_start|>user\n{PLACEHOLDER}{PLACEHOLDER}hi<|im_end|>\n"
    with pytest.raises(PromptError) as info:
        normalize_placeholders(rendered, 1, PLACEHOLDER, IMAGE_TOKEN)
    message = info.value.message
    assert "holds 2 image placeholder(s)" in message and "for 1 image(s)" in message
    assert IMAGE_TOKEN in message
    assert info.value.field == "messages"
    with pytest.raises(PromptError, match="holds 0 image placeholder"):
        normalize_placeholders("no images here", 1, PLACEHOLDER, IMAGE_TOKEN)


def test_image_token_smuggled_in_text_is_caught(processor):
    msgs = template_messages(messages(user(image_url(), text(f"look {IMAGE_TOKEN} here"))))
    rendered = render(processor, msgs)
    with pytest.raises(PromptError, match="holds 2 image placeholder"):
        normalize_placeholders(rendered, 1, PLACEHOLDER, IMAGE_TOKEN)


def test_media_marker_regex_is_not_greedy():
    two = f"a{OPENCUA_IMAGE_SPAN}b{OPENCUA_IMAGE_SPAN}c"
    assert MEDIA_SPAN.findall(two) == [OPENCUA_IMAGE_SPAN, OPENCUA_IMAGE_SPAN]
    assert normalize_placeholders(two, 2, PLACEHOLDER, IMAGE_TOKEN) == (
        f"a{PLACEHOLDER}b{PLACEHOLDER}c"
    )


def test_opencua_template_renders_media_markers(opencua_processor):
    rendered = render(opencua_processor, template_messages(messages(user(image(), text("hi")))))
    assert rendered.count(OPENCUA_IMAGE_SPAN) == 1
    assert IMAGE_TOKEN not in rendered and PLACEHOLDER not in rendered


def test_opencua_media_span_becomes_the_placeholder(opencua_processor):
    msgs = template_messages(messages(user(image_url(), text("Click Submit"))))
    rendered = render(opencua_processor, msgs)
    out = normalize_placeholders(rendered, 1, PLACEHOLDER, IMAGE_TOKEN)
    assert out == rendered.replace(OPENCUA_IMAGE_SPAN, PLACEHOLDER)
    assert out.count(PLACEHOLDER) == 1 and out.count(IMAGE_TOKEN) == 1
    assert not any(token in out for token in MEDIA_TOKENS)
    assert f"{PLACEHOLDER}Click Submit<|im_end|>" in out
    assert out.startswith(DEFAULT_SYSTEM) and out.endswith(GENERATION_PROMPT)


def test_opencua_two_images_give_two_placeholders(opencua_processor, processor):
    msgs = template_messages(
        messages(
            user(image_url(), text("before")),
            {"role": "assistant", "content": "ok"},
            user(text("after"), image()),
        )
    )
    out = normalize_placeholders(render(opencua_processor, msgs), 2, PLACEHOLDER, IMAGE_TOKEN)
    assert out.count(PLACEHOLDER) == 2 and out.count(IMAGE_TOKEN) == 2
    assert not any(token in out for token in MEDIA_TOKENS)
    # Identical to what the Qwen template renders for the same conversation.
    assert out == render(processor, msgs)
    with pytest.raises(PromptError, match="holds 2 image placeholder"):
        normalize_placeholders(render(opencua_processor, msgs), 1, PLACEHOLDER, IMAGE_TOKEN)


def test_opencua_placeholder_tokenizes_to_the_image_token(opencua_processor):
    tok = opencua_processor.tokenizer
    ids = tok.encode(PLACEHOLDER, add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids) == [
        "<|vision_start|>",
        "<|image_pad|>",
        "<|vision_end|>",
    ]
    assert QWEN_IMAGE_SPAN == PLACEHOLDER


# ---------------------------------------------------------------- check_length


@pytest.mark.parametrize(("tokens", "limit"), [(4096, 4096), (4097, 4096), (10**6, 8), (1, 1)])
def test_check_length_refuses_at_or_over_the_limit(tokens, limit):
    with pytest.raises(PromptTooLong) as info:
        check_length(tokens, limit)
    message = info.value.message
    assert f"{tokens} tokens" in message and f"is {limit}" in message
    assert "MAX_MODEL_LEN" in message and "IMAGE_MAX_PIXELS" in message
    assert info.value.field == "messages"
    assert info.value.to_dict()["error"]["type"] == "prompt_too_long"
    assert isinstance(info.value, PromptError)


@pytest.mark.parametrize(("tokens", "limit"), [(4095, 4096), (0, 1), (1, 4096)])
def test_check_length_passes_below_the_limit(tokens, limit):
    assert check_length(tokens, limit) is None


# ---------------------------------------------------------------- geometry_from


def test_geometry_from_the_processor(processor):
    ip = processor.image_processor
    geo = geometry_from(ip, mm_kwargs({}))
    assert geo == ImageGeometry(patch_size=14, merge_size=2, min_pixels=3136, max_pixels=1003520)
    assert geo.factor == 28
    # The numbers really come from the processor's config, not from defaults that agree.
    assert (ip.patch_size, ip.merge_size) == (14, 2)
    assert (ip.size["shortest_edge"], ip.size["longest_edge"]) == (3136, 1003520)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"IMAGE_MIN_PIXELS": "50176"}, (50176, 1003520)),
        ({"IMAGE_MAX_PIXELS": "200704"}, (3136, 200704)),
        ({"IMAGE_MIN_PIXELS": "784", "IMAGE_MAX_PIXELS": "2007040"}, (784, 2007040)),
        ({"IMAGE_MIN_PIXELS": "", "IMAGE_MAX_PIXELS": " "}, (3136, 1003520)),
    ],
)
def test_geometry_settings_override_the_processor(processor, env, expected):
    geo = geometry_from(processor.image_processor, mm_kwargs(env))
    assert (geo.min_pixels, geo.max_pixels) == expected
    assert (geo.patch_size, geo.merge_size) == (14, 2)


@pytest.mark.parametrize(
    "ip",
    [
        SimpleNamespace(
            size={"shortest_edge": 1024, "longest_edge": 65536}, patch_size=16, merge_size=2
        ),
        SimpleNamespace(size=None, min_pixels=1024, max_pixels=65536, patch_size=16, merge_size=2),
        SimpleNamespace(
            size=SimpleNamespace(shortest_edge=1024, longest_edge=65536),
            patch_size=16,
            merge_size=2,
        ),
    ],
    ids=["dict-size", "legacy-attributes", "attribute-size"],
)
def test_geometry_from_other_processor_shapes(ip):
    geo = geometry_from(ip, mm_kwargs({}))
    assert geo == ImageGeometry(patch_size=16, merge_size=2, min_pixels=1024, max_pixels=65536)
    assert geo.factor == 32
    over = geometry_from(ip, mm_kwargs({"IMAGE_MAX_PIXELS": "4096"}))
    assert (over.min_pixels, over.max_pixels) == (1024, 4096)


def test_geometry_defaults_when_processor_says_nothing():
    geo = geometry_from(SimpleNamespace(), mm_kwargs({}))
    assert geo == ImageGeometry()
