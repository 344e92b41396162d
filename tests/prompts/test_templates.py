"""Templates, the registry and its load-time validation, token budgets, few-shot selection and
experiment assignment, with the real SmolLM2 tokenizer and the real MiniLM embedder."""

from __future__ import annotations

import math
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from prompts.budget import ChatFormat, Parts, fit
from prompts.eval import EvalItem, parse_variants, score
from prompts.experiments import Experiment
from prompts.fewshot import FewShotSelector
from prompts.registry import PromptLoadError, PromptRegistry
from prompts.template import Example, PromptError, Template, TemplateSpec
from rag.embeddings import SentenceTransformerEmbedder
from tests.conftest import REPO


def make(**fields: object) -> Template:
    return Template(TemplateSpec.model_validate({"name": "t", "version": 1, **fields}))


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text).lstrip())
    return path


@pytest.fixture(scope="module")
def chat(tokenizer) -> ChatFormat:  # type: ignore[no-untyped-def]
    return ChatFormat(tokenizer, 2048)


# -- rendering ---------------------------------------------------------------------------------


def test_render_with_variables_defaults_and_literal_braces() -> None:
    t = make(
        variables={"country": {"type": "string"}, "tone": {"type": "string", "default": "plain"}},
        system='Reply as JSON like {"city": "..."} in a {{ tone }} tone.',
        user="Capital of {{ country }}? ({{ input }})",
        chain_of_thought="Think first.",
        output_format="One line.",
    )
    messages = t.render(t.bind({"country": "Peru"}, "asked by a student"))
    assert messages == [
        {
            "role": "system",
            "content": 'Reply as JSON like {"city": "..."} in a plain tone.\n\nThink first.'
            "\n\nOne line.",
        },
        {"role": "user", "content": "Capital of Peru? (asked by a student)"},
    ]


def test_missing_unknown_and_mistyped_variables_are_errors() -> None:
    t = make(variables={"n": {"type": "integer"}}, user="{{ n }}")
    with pytest.raises(PromptError, match="needs the variable 'n'") as missing:
        t.bind({}, "")
    assert missing.value.param == "ragline.variables.n"
    with pytest.raises(PromptError, match="has no variable 'x'"):
        t.bind({"n": 1, "x": 2}, "")
    with pytest.raises(PromptError, match="must be a integer"):
        t.bind({"n": "one"}, "")
    with pytest.raises(PromptError, match="must be a integer"):
        t.bind({"n": True}, "")


def test_strict_undefined_fails_instead_of_rendering_empty() -> None:
    t = make(variables={"doc": {"type": "object", "default": {}}}, user="Title: {{ doc.title }}")
    with pytest.raises(PromptError, match="failed to render"):
        t.render(t.bind({}, ""))


@pytest.mark.parametrize(
    "attack",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ input.__class__ }}",
        "{{ cycler.__init__.__globals__.os }}",
        "{% set x = context.append(1) %}{{ x }}",
    ],
)
def test_sandbox_refuses_escapes(attack: str) -> None:
    t = make(user=attack)
    with pytest.raises(PromptError) as err:
        t.render(t.bind({}, "hello"))
    assert "unsafe" in err.value.message or "failed to render" in err.value.message


def test_builtin_names_cannot_be_declared() -> None:
    with pytest.raises(ValueError, match="built in"):
        TemplateSpec.model_validate({"name": "t", "version": 1, "variables": {"input": {}}})


# -- registry ----------------------------------------------------------------------------------


def test_label_version_and_default_resolution(tmp_path: Path) -> None:
    write(
        tmp_path,
        "qa.yaml",
        """
        name: qa
        version: 1
        labels: [production]
        user: "v1 {{ input }}"
        ---
        name: qa
        version: 2
        labels: [canary]
        user: "v2 {{ input }}"
        """,
    )
    write(tmp_path, "other.yml", "name: other\nversion: 3\nuser: x\n")
    reg = PromptRegistry.load(tmp_path)
    assert reg.resolve("qa").ref == "qa@1"  # the production label wins over the newest
    assert reg.resolve("qa@2").ref == "qa@2"
    assert reg.resolve("qa:canary").ref == "qa@2"
    assert reg.resolve("other").ref == "other@3"  # no production label: newest
    for bad, why in [
        ("qa@9", "no version 9"),
        ("qa:beta", "no version labelled 'beta'"),
        ("nope", "no prompt template named"),
        ("qa@x", "bad template reference"),
    ]:
        with pytest.raises(PromptError, match=why):
            reg.resolve(bad)
    # the built-in templates are served beside the directory's own
    assert [d["name"] for d in reg.describe()] == ["capital-qa", "grounded-qa", "other", "qa"]
    assert reg.describe()[3]["labels"] == {"production": 1, "canary": 2}


def test_load_errors_name_file_and_line(tmp_path: Path) -> None:
    write(
        tmp_path,
        "bad.yaml",
        """
        name: broken
        version: 1
        system: |
          line one
          {% if %}
        user: "{{ input }}"
        ---
        name: unknown-var
        version: 1
        variables:
          a: {}
        user: |
          {{ a }}
          {{ b }}
        """,
    )
    write(tmp_path, "dup.yaml", "name: ok\nversion: 1\nuser: x\n")
    write(tmp_path, "ok.yaml", "name: ok\nversion: 1\nuser: y\n")
    write(tmp_path, "schema.yaml", "name: s\nversion: 0\nuser: x\n")
    write(tmp_path, "yaml.yaml", "name: [unclosed\n")
    with pytest.raises(PromptLoadError) as err:
        PromptRegistry.load(tmp_path)
    text = "\n".join(err.value.errors)
    assert f"{tmp_path / 'bad.yaml'}:5: bad Jinja in system" in text
    assert f"{tmp_path / 'bad.yaml'}:14: user uses the undeclared variable 'b'" in text
    assert "schema.yaml:1: version: Input should be greater than or equal to 1" in text
    assert f"{tmp_path / 'yaml.yaml'}:" in text and "not valid YAML" in text
    assert f"ok.yaml:1: ok version 1 is also defined at {tmp_path / 'dup.yaml'}:1" in text


def test_a_label_on_two_versions_and_dangling_references_are_refused(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "name: a\nversion: 1\nlabels: [production]\nuser: x\n")
    write(tmp_path, "b.yaml", "name: a\nversion: 2\nlabels: [production]\nuser: y\n")
    with pytest.raises(PromptLoadError, match="label 'production' of a is also on"):
        PromptRegistry.load(tmp_path)
    (tmp_path / "b.yaml").unlink()
    reg = PromptRegistry.load(tmp_path)
    with pytest.raises(PromptLoadError, match=r"routes\[r\].template: .*no version labelled"):
        reg.check_refs([("routes[r].template", "a:canary")])


def test_shipped_templates_load() -> None:
    reg = PromptRegistry.load(REPO / "prompts" / "templates")
    assert reg.resolve("capital-qa").ref == "capital-qa@2"
    assert reg.resolve("capital-qa:verbose").ref == "capital-qa@1"
    assert reg.resolve("grounded-qa").spec.few_shot is not None


# -- chat format and token budget --------------------------------------------------------------


def test_chat_format_counts_like_the_engine_and_has_one_bos(chat: ChatFormat, tokenizer) -> None:  # type: ignore[no-untyped-def]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat.count(messages) == len(tokenizer.encode(text, add_special_tokens=False))
    ids = tokenizer.encode(chat.prompt_text(messages), add_special_tokens=False)
    special = tokenizer.bos_token_id
    assert special is None or ids[:2].count(special) <= 1
    assert chat.supports_system


def test_system_is_folded_into_the_user_turn_when_the_template_has_no_system_role(
    tokenizer,  # type: ignore[no-untyped-def]
) -> None:
    class NoSystem:
        bos_token = None

        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):  # type: ignore[no-untyped-def]
            if messages[0]["role"] == "system":
                raise ValueError("System role not supported")
            return tokenizer.apply_chat_template(messages, tokenize=False)

    fmt = ChatFormat(NoSystem(), 2048)
    assert not fmt.supports_system
    merged = fmt.normalize([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
    assert merged == [{"role": "user", "content": "S\n\nU"}]


def budget_template(order: list[str]) -> Template:
    return make(
        system="{% for d in context %}[{{ loop.index }}] {{ d.text }}\n{% endfor %}",
        user="{{ input }}",
        budget={"trim_order": order},
    )


def parts() -> Parts:
    docs = [{"text": f"document {i} " + "alpha " * 60} for i in range(4)]
    examples = [Example(user=f"example {i} " + "beta " * 60, assistant="ok") for i in range(3)]
    history = []
    for i in range(3):
        history += [
            {"role": "user", "content": f"turn {i} " + "gamma " * 60},
            {"role": "assistant", "content": "fine"},
        ]
    return Parts(examples, docs, history)


def test_budget_trims_context_then_examples_then_history(chat: ChatFormat) -> None:
    t = budget_template(["context", "few_shot", "history"])
    full = fit(t, t.bind({}, "the question"), parts(), ChatFormat(chat.tokenizer, 4096), None)
    assert full.trimmed == {} and full.context == 4 and full.examples == 3 and full.history == 6
    budget = ChatFormat(chat.tokenizer, full.prompt_tokens - 30)  # drops one document
    one = fit(t, t.bind({}, "the question"), parts(), budget, None)
    assert one.trimmed == {"context": 1} and one.context == 3
    assert "document 3" not in one.messages[0]["content"]  # the least relevant went first
    small = ChatFormat(chat.tokenizer, full.prompt_tokens - 300)
    more = fit(t, t.bind({}, "the question"), parts(), small, None)
    assert more.trimmed["context"] == 4 and more.trimmed["few_shot"] >= 1
    tiny = ChatFormat(chat.tokenizer, 80)
    least = fit(t, t.bind({}, "the question"), parts(), tiny, 16)
    assert least.trimmed == {"context": 4, "few_shot": 3, "history": 6}
    assert least.messages[-1] == {"role": "user", "content": "the question"}
    assert least.prompt_tokens is not None and least.prompt_tokens <= 80 - 16


def test_budget_order_is_the_templates_and_never_touches_the_question(chat: ChatFormat) -> None:
    t = budget_template(["history", "context", "few_shot"])
    full = fit(t, t.bind({}, "q"), parts(), ChatFormat(chat.tokenizer, 4096), None)
    cut = fit(
        t, t.bind({}, "q"), parts(), ChatFormat(chat.tokenizer, full.prompt_tokens - 50), None
    )
    assert cut.trimmed == {"history": 2}  # a user turn and its answer
    assert cut.messages[-1]["content"] == "q"
    with pytest.raises(PromptError, match="after trimming everything") as err:
        fit(t, t.bind({}, "word " * 500), parts(), ChatFormat(chat.tokenizer, 300), 10)
    assert err.value.param == "messages"


def test_budget_renders_a_few_times_whatever_the_history(chat: ChatFormat) -> None:
    """A long history trimmed to fit costs a handful of renders (binary search over the number
    of drops), and trims exactly what dropping one item at a time would."""
    t = budget_template(["context", "few_shot", "history"])
    history = []
    for i in range(200):
        history += [{"role": "user", "content": f"turn {i} delta"},
                    {"role": "assistant", "content": "fine"}]  # fmt: skip
    many = Parts([], [], history)
    renders = 0
    original = t.render

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal renders
        renders += 1
        return original(*args, **kwargs)

    t.render = counted  # type: ignore[method-assign]
    fmt = ChatFormat(chat.tokenizer, 600)
    fitted = fit(t, t.bind({}, "the question"), many, fmt, 32)
    assert renders <= 12  # log2(200) + 2, not 200
    assert fitted.prompt_tokens is not None and fitted.prompt_tokens <= 600 - 32
    # one more turn of history would not have fitted: the fewest drops
    kept = fitted.history
    assert 0 < kept < 400 and fitted.trimmed == {"history": 400 - kept}
    wider = Parts([], [], history[-(kept + 2) :])
    assert (
        fit(
            t, t.bind({}, "the question"), wider, ChatFormat(chat.tokenizer, 4096), None
        ).prompt_tokens
        > 600 - 32
    )  # type: ignore[operator]


# -- few-shot selection ------------------------------------------------------------------------


def test_dynamic_few_shot_picks_the_nearest_examples_within_budget(chat: ChatFormat) -> None:
    examples = [
        {"user": "How do I reset my password?", "assistant": "Use the reset link."},
        {"user": "What is the refund policy for damaged goods?", "assistant": "Full refund."},
        {"user": "Which cities do you ship to?", "assistant": "All of Europe."},
        {"user": "Can I change my account password from the app?", "assistant": "Yes."},
        {"user": "Do you deliver to Norway?", "assistant": "Yes, in 5 days."},
    ]
    t = make(few_shot={"mode": "dynamic", "k": 2, "examples": examples})
    selector = FewShotSelector(SentenceTransformerEmbedder())
    chosen = selector.select(t, "I forgot my password, how can I change it?", chat.count_text)
    assert {e.user for e in chosen} == {examples[0]["user"], examples[3]["user"]}
    shipping = selector.select(t, "Is shipping to Oslo possible?", chat.count_text)
    assert {e.user for e in shipping} == {examples[2]["user"], examples[4]["user"]}
    tight = make(few_shot={"mode": "dynamic", "k": 2, "max_tokens": 16, "examples": examples})
    assert len(selector.select(tight, "password change", chat.count_text)) == 1
    static = make(few_shot={"mode": "static", "k": 2, "examples": examples})
    assert [e.user for e in selector.select(static, "anything")] == [
        examples[0]["user"],
        examples[1]["user"],
    ]


# -- experiments -------------------------------------------------------------------------------


def test_assignment_is_deterministic_sticky_and_weighted() -> None:
    exp = Experiment.model_validate(
        {
            "name": "qa-ab",
            "variants": [
                {"name": "a", "weight": 70, "template": "qa@1"},
                {"name": "b", "weight": 20, "template": "qa@2"},
                {"name": "c", "weight": 10, "template": "qa@3"},
            ],
        }
    )
    users = [f"user-{i}" for i in range(10_000)]
    first = [exp.assign(u).name for u in users]
    assert first == [exp.assign(u).name for u in users]  # sticky: same user, same arm
    counts = Counter(first)
    for name, weight in (("a", 0.7), ("b", 0.2), ("c", 0.1)):
        sd = math.sqrt(10_000 * weight * (1 - weight))
        assert abs(counts[name] - 10_000 * weight) < 4 * sd, counts
    other = exp.model_copy(update={"name": "other-experiment"})
    moved = sum(exp.assign(u).name != other.assign(u).name for u in users)
    assert moved > 3000  # experiments assign independently of each other


def test_duplicate_variant_names_are_refused() -> None:
    with pytest.raises(ValueError, match="unique"):
        Experiment.model_validate(
            {"name": "x", "variants": [{"name": "a", "weight": 1}, {"name": "a", "weight": 1}]}
        )


# -- evaluation scorers ------------------------------------------------------------------------


def test_scorers() -> None:
    def item(expected: object, scorer: str, field: str | None = None) -> EvalItem:
        return EvalItem.model_validate({"expected": expected, "scorer": scorer, "field": field})

    assert score(item("Brasília", "exact"), " brasilia. ", "contains")
    assert not score(item("Paris", "exact"), "It is Paris", "contains")
    assert score(item("Bogotá", "contains"), "The capital is Bogota.", "exact")
    assert score(item(r"ky[iy]v|kiev", "regex"), "Kyiv", "contains")
    assert score(item(42, "json", "a.b"), 'Sure: {"a": {"b": 42}} done', "contains")
    assert not score(item(42, "json", "a.c"), '{"a": {"b": 42}}', "contains")
    assert not score(item(42, "json", "a"), "no json here", "contains")
    assert parse_variants("short=qa@2, qa@1") == [("short", "qa@2"), ("qa@1", "qa@1")]


def test_a_prompts_dir_keeps_the_builtin_templates_unless_it_redefines_them(tmp_path: Path) -> None:
    """Issue 23, item 4: setting prompts.dir used to remove the built-in grounded-qa, so a rag
    route without its own template broke."""
    from prompts.registry import BUILTIN_DIR

    write(tmp_path, "mine.yaml", "name: mine\nversion: 1\nuser: '{{ input }}'\n")
    reg = PromptRegistry.load(tmp_path)
    grounded = reg.resolve("grounded-qa")
    assert grounded.source.startswith(str(BUILTIN_DIR)) and reg.resolve("mine").ref == "mine@1"
    # a template of the same name in the directory replaces the built-in one, every version
    write(tmp_path, "grounded.yaml", "name: grounded-qa\nversion: 7\nuser: 'mine {{ input }}'\n")
    reg = PromptRegistry.load(tmp_path)
    assert reg.resolve("grounded-qa").ref == "grounded-qa@7"
    assert [d["versions"] for d in reg.describe() if d["name"] == "grounded-qa"] == [[7]]
