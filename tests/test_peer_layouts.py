"""Other tools' data read as they write it: every field of a row used or refused with the reason.

Each file here is written in the documented structure of its tool (same field names and nesting):
LLaMA-Factory's `data/mllm_demo.json`, `mllm_video_demo.json`, `mllm_audio_demo.json` and its classic
sharegpt rows; ms-swift's "Custom dataset" messages and query-response rows; the content parts of
transformers' chat templates, OpenAI's API and LLaMA-Factory.
"""

from __future__ import annotations

import base64
import copy
import json
from pathlib import Path

import pytest
from PIL import Image

from vlmtune import families
from vlmtune.data.conversation import Conversation, Part, Turn
from vlmtune.data.formats import RowProblem, read_rows
from vlmtune.data.formatting import FormatError, Formatter
from vlmtune.data.prepare import prepare
from vlmtune.validation import ValidationReport

from .conftest import write_jsonl
from .test_video import clip_file  # noqa: F401 - a fixture: a 2-second MPEG-4 file written with PyAV


@pytest.fixture
def lf(tmp_path) -> Path:
    """A folder laid out as LLaMA-Factory's `data/`: `mllm_demo_data/1.jpg`, `2.jpg`, `3.jpg`."""
    (tmp_path / "mllm_demo_data").mkdir()
    for k, colour in enumerate(((200, 0, 0), (0, 200, 0), (0, 0, 200)), start=1):
        Image.new("RGB", (56, 42), colour).save(tmp_path / "mllm_demo_data" / f"{k}.jpg")
    return tmp_path


def write_json(path: Path, items: list) -> Path:
    path.write_text(json.dumps(items, indent=2), encoding="utf-8")
    return path


def layout(conv: Conversation) -> list[tuple]:
    """(role, train, [(part type, text or file name)]) per turn."""
    def name(p: Part) -> str:
        if p.type == "text":
            return p.text
        ref = p.image if p.type == "image" else p.video
        return [Path(f).name for f in ref] if isinstance(ref, tuple) else Path(ref).name
    return [(t.role, t.train, [(p.type, name(p)) for p in t.parts]) for t in conv.turns]


def only(items) -> Conversation | RowProblem:
    (item,) = list(items)
    return item


def qwen(processor_for):
    family = families.get("qwen2_vl")
    return family, Formatter(family, processor_for("qwen2_vl"))


# --- LLaMA-Factory ---------------------------------------------------------------------------------------------------

MLLM_DEMO = [{"messages": [{"content": "<image>Who are they?", "role": "user"},
                           {"content": "They're Kane and Gretzka from Bayern Munich.", "role": "assistant"},
                           {"content": "What are they doing?<image>", "role": "user"},
                           {"content": "They are celebrating on the soccer field.", "role": "assistant"}],
              "images": ["mllm_demo_data/1.jpg", "mllm_demo_data/1.jpg"]},
             {"messages": [{"content": "<image>Who is he?", "role": "user"},
                           {"content": "He's Thomas Muller from Bayern Munich.", "role": "assistant"}],
              "images": ["mllm_demo_data/2.jpg"]}]


def test_llamafactory_mllm_demo_reads_its_tags_in_place(lf, processor_for):
    first, second = read_rows(write_json(lf / "mllm_demo.json", MLLM_DEMO), "sharegpt")
    assert layout(first) == [
        ("user", True, [("image", "1.jpg"), ("text", "Who are they?")]),
        ("assistant", True, [("text", "They're Kane and Gretzka from Bayern Munich.")]),
        ("user", True, [("text", "What are they doing?"), ("image", "1.jpg")]),
        ("assistant", True, [("text", "They are celebrating on the soccer field.")])]
    family, formatter = qwen(processor_for)
    data = prepare(lf / "mllm_demo.json", "sharegpt", None, formatter, family, 4096)
    assert (len(data.examples), data.num_images, data.problems, data.warnings) == (2, 3, [], [])


MLLM_VIDEO_DEMO = [{"messages": [{"content": "<video>Why is this video funny?", "role": "user"},
                                 {"content": "Because a baby is reading, and he is so cute!", "role": "assistant"}],
                    "videos": ["mllm_demo_data/1.mp4"]}]


def test_llamafactory_mllm_video_demo_trains_on_the_video_not_on_its_tag(lf, clip_file, processor_for):  # noqa: F811
    Path(clip_file).replace(lf / "mllm_demo_data" / "1.mp4")
    path = write_json(lf / "mllm_video_demo.json", MLLM_VIDEO_DEMO)
    assert layout(only(read_rows(path, "sharegpt"))) == [
        ("user", True, [("video", "1.mp4"), ("text", "Why is this video funny?")]),
        ("assistant", True, [("text", "Because a baby is reading, and he is so cute!")])]
    family, formatter = qwen(processor_for)
    data = prepare(path, "sharegpt", None, formatter, family, 4096)
    assert (len(data.examples), data.num_videos, data.problems) == (1, 1, [])
    text = formatter.tokenizer.decode(data.examples[0].input_ids)
    assert "<video>" not in text and "<|video_pad|>" in text
    llava = families.get("llava")  # a family without video refuses the row, naming why
    data = prepare(path, "sharegpt", None, Formatter(llava, processor_for("llava")), llava, 4096)
    assert [p.row for p in data.problems] == [1] and "does not take video" in data.problems[0].message


def test_a_video_given_as_frames_reads_as_one_video(lf):
    rows = [{"messages": [{"content": "<video>What moves?", "role": "user"}, {"content": "A ball.", "role": "assistant"}],
             "videos": [["mllm_demo_data/1.jpg", "mllm_demo_data/2.jpg"]]}]
    conv = only(read_rows(write_json(lf / "v.json", rows), "sharegpt"))
    assert layout(conv)[0][2] == [("video", ["1.jpg", "2.jpg"]), ("text", "What moves?")]


MLLM_AUDIO_DEMO = [{"messages": [{"content": "<audio>What's that sound?", "role": "user"},
                                 {"content": "It is the sound of glass shattering.", "role": "assistant"}],
                    "audios": ["mllm_demo_data/1.mp3"]}]


@pytest.mark.parametrize("fmt", ["sharegpt", "messages"])
def test_audio_is_refused_with_the_reason(lf, fmt):
    problem = only(read_rows(write_json(lf / "mllm_audio_demo.json", MLLM_AUDIO_DEMO), fmt))
    assert isinstance(problem, RowProblem) and problem.row == 1
    assert '"audios" holds audio, but no model family vlmtune trains takes audio' in problem.message
    tag_only = [{"messages": MLLM_AUDIO_DEMO[0]["messages"]}]
    problem = only(read_rows(write_json(lf / "tag.json", tag_only), fmt))
    assert isinstance(problem, RowProblem) and "<audio> in the text, but no model family" in problem.message


def classic_sharegpt(**extra) -> dict:
    return {"conversations": [{"from": "human", "value": "<image>What colour is it?"}, {"from": "gpt", "value": "Red."}],
            "images": ["mllm_demo_data/1.jpg"], **extra}


def test_llamafactory_classic_sharegpt_system_becomes_the_system_turn(lf, processor_for):
    path = write_json(lf / "s.json", [classic_sharegpt(system="Answer in one word.")])
    conv = only(read_rows(path, "sharegpt"))
    assert layout(conv)[0] == ("system", True, [("text", "Answer in one word.")])
    family, formatter = qwen(processor_for)
    text = formatter.tokenizer.decode(prepare(path, "sharegpt", None, formatter, family, 4096).examples[0].input_ids)
    assert "<|im_start|>system\nAnswer in one word.<|im_end|>" in text and "You are a helpful assistant" not in text


def test_a_row_system_and_a_system_message_together_are_a_row_problem(lf):
    row = classic_sharegpt(system="A.")
    row["conversations"].insert(0, {"from": "system", "value": "B."})
    problem = only(read_rows(write_json(lf / "s.json", [row]), "sharegpt"))
    assert isinstance(problem, RowProblem) and 'both "system" and a system message' in problem.message


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
TOOLS_TEMPLATE = "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"


def test_tools_go_to_a_template_that_renders_them_and_are_refused_where_it_does_not(lf, processor_for):
    path = write_json(lf / "t.json", [classic_sharegpt(tools=json.dumps(TOOLS))])  # LLaMA-Factory: a JSON string
    assert only(read_rows(path, "sharegpt")).tools == TOOLS
    family, formatter = qwen(processor_for)
    data = prepare(path, "sharegpt", None, formatter, family, 4096)  # the tiny Qwen2-VL template ignores tools
    assert [p.row for p in data.problems] == [1]
    assert 'the row gives "tools", but the chat template of this model' in data.problems[0].message
    processor = copy.copy(processor_for("qwen2_vl"))
    processor.chat_template = TOOLS_TEMPLATE + processor.chat_template
    formatter = Formatter(family, processor)
    (example,) = prepare(path, "sharegpt", None, formatter, family, 4096).examples
    tok = formatter.tokenizer
    assert '"name": "get_weather"' in tok.decode(example.input_ids)
    supervised = tok.decode([i for i, label in zip(example.input_ids, example.labels, strict=True) if label != -100])
    assert supervised == "Red.<|im_end|>"  # the tool definitions are prompt, never trained on


@pytest.mark.parametrize("role", ["function_call", "observation"])
def test_tool_call_turns_are_refused_with_the_reason(lf, role):
    row = classic_sharegpt(tools=json.dumps(TOOLS))
    row["conversations"][1:1] = [{"from": "function_call", "value": '{"name": "get_weather", "arguments": {}}'},
                                 {"from": "observation", "value": "sunny"}]
    if role == "observation":
        row["conversations"][1]["from"] = "gpt"
    problem = only(read_rows(write_json(lf / "t.json", [row]), "sharegpt"))
    assert isinstance(problem, RowProblem) and f"role '{role}' is a tool call or a tool result" in problem.message


# --- ms-swift ----------------------------------------------------------------------------------------------------------

def swift_row(**extra) -> dict:
    return {"messages": [{"role": "system", "content": "You are a careful annotator."},
                         {"role": "user", "content": "<image>What is this?"},
                         {"role": "assistant", "content": "A red square.", "loss": False},
                         {"role": "user", "content": "<image>And this?"},
                         {"role": "assistant", "content": "A green square."}],
            "images": ["mllm_demo_data/1.jpg", "mllm_demo_data/2.jpg"], **extra}


@pytest.mark.parametrize("fmt", ["messages", "sharegpt"])
def test_swift_messages_read_tags_images_and_the_loss_flag(lf, fmt, processor_for):
    path = write_jsonl(lf / "swift.jsonl", [swift_row(videos=[], audios=[])])
    assert layout(only(read_rows(path, fmt))) == [
        ("system", True, [("text", "You are a careful annotator.")]),
        ("user", True, [("image", "1.jpg"), ("text", "What is this?")]),
        ("assistant", False, [("text", "A red square.")]),
        ("user", True, [("image", "2.jpg"), ("text", "And this?")]),
        ("assistant", True, [("text", "A green square.")])]
    family, formatter = qwen(processor_for)
    (example,) = prepare(path, fmt, None, formatter, family, 4096).examples
    supervised = formatter.tokenizer.decode([i for i, lab in zip(example.input_ids, example.labels, strict=True)
                                             if lab != -100])
    assert supervised == "A green square.<|im_end|>"  # "loss": false kept the first reply out


def test_swift_videos_and_tools_are_used(lf, clip_file):  # noqa: F811
    row = {"messages": [{"role": "user", "content": "<video>What happens?"}, {"role": "assistant", "content": "It fades."}],
           "videos": [clip_file], "tools": TOOLS}
    conv = only(read_rows(write_jsonl(lf / "swift.jsonl", [row]), "messages"))
    assert conv.videos == [clip_file] and conv.tools == TOOLS


def test_swift_query_response_with_history(lf):
    row = {"system": "Be brief.", "query": "<image>And now?", "response": "Blue.",
           "history": [["<image>Colour?", "Red."], ["Sure?", "Yes."]],
           "images": ["mllm_demo_data/1.jpg", "mllm_demo_data/3.jpg"]}
    assert layout(only(read_rows(write_jsonl(lf / "qr.jsonl", [row]), "sharegpt"))) == [
        ("system", True, [("text", "Be brief.")]),
        ("user", True, [("image", "1.jpg"), ("text", "Colour?")]), ("assistant", True, [("text", "Red.")]),
        ("user", True, [("text", "Sure?")]), ("assistant", True, [("text", "Yes.")]),
        ("user", True, [("image", "3.jpg"), ("text", "And now?")]), ("assistant", True, [("text", "Blue.")])]
    bad = [{**row, "history": [["only a query"]]}, {"messages": swift_row()["messages"], "history": [["q", "r"]]}]
    problems = list(read_rows(write_jsonl(lf / "bad.jsonl", bad), "sharegpt"))
    assert '"history"[0] must be a ["query", "response"] pair of strings' in problems[0].message
    assert '"history" belongs to the query-response form' in problems[1].message


# --- OpenAI fine-tuning -------------------------------------------------------------------------------------------------

def test_openai_fine_tuning_rows_with_image_url_parts_and_weight(lf):
    b64 = base64.b64encode((lf / "mllm_demo_data" / "1.jpg").read_bytes()).decode()
    row = {"messages": [
        {"role": "system", "content": "You name colours."},
        {"role": "user", "content": [{"type": "text", "text": "Colour?"},
                                     {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{b64}"}}]},
        {"role": "assistant", "content": "Blue.", "weight": 0},
        {"role": "user", "content": "Really?"}, {"role": "assistant", "content": "Red.", "weight": 1}]}
    disagree = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 1,
                                                               "loss": False}]}
    conv, problem = read_rows(write_jsonl(lf / "openai.jsonl", [row, disagree]), "messages")
    assert [(t.role, t.train) for t in conv.turns] == [("system", True), ("user", True), ("assistant", False),
                                                       ("user", True), ("assistant", True)]
    assert len(conv.images) == 1 and '"train", "loss" and "weight" disagree' in problem.message


# --- content parts in the forms users copy -----------------------------------------------------------------------------

def user_part(part: dict, **row) -> dict:
    return {"messages": [{"role": "user", "content": [part, {"type": "text", "text": "What colour?"}]},
                         {"role": "assistant", "content": "Red."}], **row}


def test_every_image_part_form_reads_as_the_same_image(lf):
    jpg = (lf / "mllm_demo_data" / "1.jpg").read_bytes()
    b64 = base64.b64encode(jpg).decode()
    forms = [
        {"type": "image", "image": "mllm_demo_data/1.jpg"},
        {"type": "image", "path": "mllm_demo_data/1.jpg"},  # transformers
        {"type": "image", "url": "mllm_demo_data/1.jpg"},
        {"type": "image", "base64": b64},
        {"type": "image_url", "image_url": {"url": "mllm_demo_data/1.jpg"}},  # OpenAI
        {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{b64}"}},
        {"type": "image_url", "value": "mllm_demo_data/1.jpg"},  # LLaMA-Factory
    ]
    convs = list(read_rows(write_jsonl(lf / "parts.jsonl", [user_part(f) for f in forms]), "messages"))
    assert not [c for c in convs if isinstance(c, RowProblem)], convs
    contents = {Path(c.images[0]).read_bytes() for c in convs}
    assert contents == {jpg}


def test_every_video_part_form_reads_as_the_same_video(lf, clip_file):  # noqa: F811
    forms = [{"type": "video", "video": clip_file}, {"type": "video", "path": clip_file},
             {"type": "video", "url": clip_file}, {"type": "video_url", "video_url": {"url": clip_file}}]
    convs = list(read_rows(write_jsonl(lf / "parts.jsonl", [user_part(f) for f in forms]), "messages"))
    assert [c.videos for c in convs] == [[clip_file]] * len(forms)


def test_a_misspelt_image_key_is_named_rather_than_taking_an_image_from_the_row(lf):
    rows = [user_part({"type": "image", "uri": "mllm_demo_data/1.jpg"}), user_part({"type": "image"})]
    first, second = read_rows(write_jsonl(lf / "parts.jsonl", rows), "messages")
    assert "image part with 'uri' but no file under 'image' / 'path' / 'url' / 'base64'" in first.message
    assert 'an image part names no image of its own, and the row has no "images" to take one from' in second.message


# --- tags with nothing behind them, first message the assistant's, unread columns, refused files ---------------------

@pytest.mark.parametrize("fmt, row, expected", [
    ("messages", {"messages": [{"role": "user", "content": "<image>What is it?"}, {"role": "assistant", "content": "x"}]},
     'message 0: a literal <image> tag in the text names no image of its own, and the row has no "images"'),
    ("messages", user_part({"type": "text", "text": "see <video>"}),
     'message 0 part 0: a literal <video> tag in the text names no video of its own, and the row has no "videos"'),
    ("sharegpt", {"messages": [{"role": "user", "content": "<video>Why?"}, {"role": "assistant", "content": "x"}]},
     '1 <video> placeholder in the text but 0 videos in "videos"'),
    ("llava", {"conversations": [{"from": "human", "value": "<video>Why?"}, {"from": "gpt", "value": "x"}]},
     "1 <video> placeholder in the text but 0 videos (this layout takes none)"),
    ("vqa", {"image": "mllm_demo_data/1.jpg", "question": "<image><image>Both?", "answer": "x"},
     '2 <image> placeholders in the text but 1 image in "image"'),
])
def test_a_media_tag_with_no_media_behind_it_is_a_row_problem(lf, fmt, row, expected):
    problem = only(read_rows(write_jsonl(lf / "d.jsonl", [row]), fmt))
    assert isinstance(problem, RowProblem) and problem.row == 1 and expected in problem.message, problem


@pytest.mark.parametrize("family_name", ["qwen2_vl", "llava"])
def test_a_conversation_starting_with_the_assistant_is_a_row_problem(lf, family_name, processor_for):
    rows = [{"messages": [{"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Bye."}]},
            {"conversations": [{"from": "system", "value": "S."}, {"from": "gpt", "value": "Hello."}]}]
    family = families.get(family_name)
    formatter = Formatter(family, processor_for(family_name))
    path = write_jsonl(lf / "d.jsonl", rows)
    for fmt, row in (("messages", 1), ("sharegpt", 2)):
        data = prepare(path, fmt, None, formatter, family, 4096)
        problem = next(p for p in data.problems if p.row == row)
        assert (problem.file, problem.row) == (str(path), row)
        assert "starts with an assistant reply" in problem.message
    with pytest.raises(FormatError, match="starts with an assistant reply"):  # built by hand, not read
        formatter(Conversation([Turn("assistant", [Part("text", text="Hello.")])], source="api:1"), [])


def test_columns_and_keys_nothing_reads_are_reported_once_per_file(lf, processor_for):
    row = {**user_part({"type": "image", "image": "mllm_demo_data/1.jpg"}), "id": "a1", "objects": {"bbox": [1, 2]}}
    row["messages"][0]["name"] = "alice"
    rows = [row, row, {**row, "source": "web"}]
    family, formatter = qwen(processor_for)
    data = prepare(write_jsonl(lf / "d.jsonl", rows), "messages", None, formatter, family, 4096)
    assert (len(data.examples), data.problems) == (3, [])
    assert [w.row for w in data.warnings] == [1, 3]
    assert 'column "objects", message key "name"' in data.warnings[0].message and '"id"' not in data.warnings[0].message
    assert 'column "source"' in data.warnings[1].message and "objects" not in data.warnings[1].message
    assert "its fields are messages, images, videos" in data.warnings[0].message
    assert f"warning: {data.warnings[0]}" in data.summary().splitlines()  # what sft prints before training
    assert f"  warning: {data.warnings[1]}" in ValidationReport({"train": data}, [], family.name).render().splitlines()


@pytest.mark.parametrize("text, expected", [
    ('[{"messages": [}]', "could not be read, so there are no examples: not valid JSON"),
])
def test_a_refused_file_says_so_instead_of_counting_one_row(lf, processor_for, text, expected):
    (lf / "d.json").write_text(text)
    family, formatter = qwen(processor_for)
    data = prepare(lf / "d.json", "sharegpt", None, formatter, family, 4096)
    assert data.refused is not None and expected in data.summary() and "1 rows" not in data.summary()


def test_a_table_missing_a_column_says_the_file_was_refused(tmp_path, processor_for):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"img": ["x.png"], "q": ["Q?"]}), tmp_path / "t.parquet")
    family, formatter = qwen(processor_for)
    summary = prepare(tmp_path / "t.parquet", "vqa", None, formatter, family, 4096).summary()
    assert summary.startswith(f"{tmp_path / 't.parquet'} could not be read, so there are no examples: column")
