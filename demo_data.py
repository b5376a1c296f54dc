"""Built-in bilingual (English + 中文) demo data: a small fictional world, in every format the pipeline trains on.

    python demo_data.py --out_dir data/demo --seed 0 --scale 1.0

Writes pretrain / SFT / reasoning / DPO training files and a held-out eval file for each (and one of tool-use
questions), in seconds, with no download. The world: 20 people, each with a home town, a job, a pet, a favourite
colour, a favourite food and an age, and 10 towns, each famous for one thing. Pretraining text states these facts in
varied templates and both languages (profiles, town pages, short stories, quizzes) next to small arithmetic, so a
`tiny` model trained for a few CPU minutes learns real structure. Later stages ask about the same facts with short,
formulaic answers, and the reasoning data works small word problems by counting one step at a time (a quarter of
the training ones answered with thinking off: an empty <think></think>). Some SFT conversations offer two tools,
lookup(person, attribute) over the world's facts and a calculator (demo_toolbox), call them and answer with what
they returned, or answer without them when the question does not need them. Each stage has an automatic metric:

    score_sft(record, text)        SFT eval: does the reply state the right fact (and no other candidate)?
    score_reasoning(record, text)  reasoning eval: well-formed <think>…</think><answer>…</answer> with the right number?
    score_direct(record, text)     thinking off: is the reply <answer>…</answer> alone, with the right number?
    score_tool_call(record, text)  tool eval: does the first call parse, name the right tool, have the right arguments?
    score_tool_answer(record, final_text, n_calls)   tool eval, calls executed: the right answer, with tool calls
                                   exactly when the question needs them?
    is_terse(record, text)         is the reply just the bare value, the style the DPO pairs reject?
    prompt_turns(record)           the turns to feed the model (up to the last user message)

Eval records carry the reference in extra keys ("answer", "attribute", "lang"; DPO: "kind"; tool use: "kind" and
"calls", the expected calls of each round), which the JSONL readers ignore. Held-out questions are chosen by a hash
of their text, so no eval question appears in any training file. Same seed, same bytes.

Train on it with the shipped tokenizer/: a BPE trained on this templated text learns whole Chinese facts ("X养了一条
金鱼") as single tokens, which turns fact recall into a vocabulary lookup.
"""
import functools
import json
import os
import random
import re
import time
import zlib
from dataclasses import dataclass

from cli import NONNEG_INT, ArgumentParser, UserError, number, run_main
from tools import Toolbox, ToolError, calculator, function_schema, parse_tool_call, tool_turns

# ------------------------------------------------------------------------------------------------- the world
# (English, 中文[, measure word]) pairs. Within one attribute no value is a substring of another, and no value is a
# substring of a person's or town's name, so scoring by substring is unambiguous (a test holds this).

PEOPLE = [  # (English name, 中文名, female)
    ("Anna", "安娜", True), ("Ben", "本杰明", False), ("Lily", "莉莉", True), ("Oscar", "奥斯卡", False),
    ("Mia", "米娅", True), ("Leo", "利奥", False), ("Emma", "艾玛", True), ("Jack", "杰克", False),
    ("Zoe", "佐伊", True), ("Max", "麦克斯", False), ("Lucy", "露西", True), ("Sam", "萨姆", False),
    ("Nora", "诺拉", True), ("Hugo", "雨果", False), ("Ruby", "露比", True), ("Felix", "菲利克斯", False),
    ("Ivy", "艾薇", True), ("Owen", "欧文", False), ("Clara", "克拉拉", True), ("Henry", "亨利", False),
]
TOWNS = [("Redhill", "红山"), ("Stonebridge", "石桥"), ("Greenport", "绿港"), ("Maplewood", "枫林"),
         ("Silverbay", "银湾"), ("Pinecrest", "松岭"), ("Irontown", "铁城"), ("Sunvale", "阳谷"),
         ("Windmere", "风湖"), ("Cloudpeak", "云峰")]
SPECIALTIES = [("tea", "茶叶"), ("silk", "丝绸"), ("glass", "玻璃"), ("clocks", "钟表"), ("cheese", "奶酪"),
               ("boats", "木船"), ("honey", "蜂蜜"), ("paper", "纸张"), ("pottery", "陶器"), ("kites", "风筝")]
JOBS = [("baker", "面包师"), ("doctor", "医生"), ("teacher", "老师"), ("farmer", "农民"), ("painter", "画家"),
        ("fisherman", "渔夫"), ("engineer", "工程师"), ("nurse", "护士"), ("pilot", "飞行员"), ("chef", "厨师")]
PETS = [("cat", "猫", "只"), ("dog", "狗", "条"), ("rabbit", "兔子", "只"), ("parrot", "鹦鹉", "只"),
        ("turtle", "乌龟", "只"), ("goldfish", "金鱼", "条"), ("horse", "马", "匹"), ("hamster", "仓鼠", "只")]
COLORS = [("red", "红色"), ("blue", "蓝色"), ("green", "绿色"), ("yellow", "黄色"), ("purple", "紫色"),
          ("white", "白色"), ("black", "黑色"), ("orange", "橙色")]
FOODS = [("noodles", "面条"), ("apples", "苹果"), ("rice", "米饭"), ("dumplings", "饺子"), ("bread", "面包"),
         ("cake", "蛋糕"), ("pizza", "披萨"), ("carrots", "胡萝卜")]
ITEMS = [("apples", "苹果", "个"), ("pencils", "铅笔", "支"), ("books", "书", "本"), ("stickers", "贴纸", "张"),
         ("cookies", "饼干", "块"), ("marbles", "弹珠", "颗"), ("flowers", "花", "朵"), ("eggs", "鸡蛋", "个")]

ATTRIBUTES = ("city", "job", "pet", "color", "food", "age")
TABLES = {"city": TOWNS, "job": JOBS, "pet": PETS, "color": COLORS, "food": FOODS, "specialty": SPECIALTIES}
NUMERIC = ("age", "number")  # attributes whose answer is an integer
LANGS = ("en", "zh")
HELDOUT_PERCENT = 20  # share of question texts reserved for the eval files
# Share of SFT fact replies that are the bare value ("34") instead of a sentence, as scraped answers often are.
# The SFT model then answers tersely about as often; the DPO pairs prefer the sentence, so DPO has a style to fix
# that SFT did not settle (the pipeline's "full answers" column).
TERSE_SHARE = 0.35
# SFT conversations by kind: facts (some multi-turn), a town's specialty, small sums, small talk, and tool use
# (TOOL_KINDS below; ~22%: most describe the tools in one system line, SHORT_TOOLS_SHARE; the rest carry the
# ~350-token schemas).
SFT_KINDS = {"fact": 70, "town": 10, "math": 12, "talk": 8, "tools": 28}


@dataclass(frozen=True)
class Person:
    en: str
    zh: str
    female: bool
    city: int
    job: int
    pet: int
    color: int
    food: int
    age: int

    def name(self, lang):
        return self.en if lang == "en" else self.zh


@dataclass(frozen=True)
class World:
    people: tuple
    specialty: tuple  # town index -> SPECIALTIES index

    def residents(self, town):
        return [p for p in self.people if p.city == town]


def build_world(rng):
    """Assign every person's attributes and every town's specialty; each town gets two residents."""
    towns = [i % len(TOWNS) for i in range(len(PEOPLE))]
    rng.shuffle(towns)
    people = tuple(Person(en, zh, female, towns[i], rng.randrange(len(JOBS)), rng.randrange(len(PETS)),
                          rng.randrange(len(COLORS)), rng.randrange(len(FOODS)), rng.randint(18, 70))
                   for i, (en, zh, female) in enumerate(PEOPLE))
    specialty = list(range(len(SPECIALTIES)))
    rng.shuffle(specialty)
    return World(people, tuple(specialty))


def value(person, attr, lang):
    """A person's attribute as text in `lang` (the age as digits)."""
    if attr == "age":
        return str(person.age)
    return TABLES[attr][getattr(person, attr)][0 if lang == "en" else 1]


def a_or_an(word):
    return ("an " if word[0] in "aeiou" else "a ") + word


def pronoun(person, lang, possessive=False):
    if lang == "zh":
        return ("她" if person.female else "他") + ("的" if possessive else "")
    return ("her" if person.female else "his") if possessive else ("she" if person.female else "he")


def fill(template, person, lang, use_pronoun=False, **extra):
    """Format a template: {n} name (or pronoun), {g} possessive, {v} the value, {av} "a/an value", {m} measure."""
    v = extra.pop("v", None)
    fields = dict(n=person.name(lang), g=person.name(lang) + ("'s" if lang == "en" else "的"), v=v, **extra)
    if v is not None and lang == "en":
        fields["av"] = a_or_an(v)
    if use_pronoun:
        fields.update(n=pronoun(person, lang), g=pronoun(person, lang, possessive=True))
    text = template.format(**fields)
    return text[0].upper() + text[1:]


def fact_fields(person, attr, lang):
    fields = {"v": value(person, attr, lang)}
    if attr == "pet" and lang == "zh":
        fields["m"] = PETS[person.pet][2]
    return fields


# ------------------------------------------------------------------------------------------------- templates
# Pretraining statements of one fact; {n} may become a pronoun after a person's first sentence.
FACTS = {
    "en": {
        "city": ["{n} lives in {v}.", "{g} home is in {v}.", "{n} has lived in {v} for many years.",
                 "{n} lives in the town of {v}."],
        "job": ["{n} works as {av}.", "{n} is {av}.", "{n} has a job as {av}.", "{n} earns a living as {av}."],
        "pet": ["{n} has a pet {v}.", "{n} keeps {av} at home.", "{g} pet is {av}.",
                "{n} takes care of a {v} every day."],
        "color": ["{g} favourite colour is {v}.", "{n} likes the colour {v} best.", "{n} loves everything {v}.",
                  "Of all colours, {n} likes {v} the most."],
        "food": ["{g} favourite food is {v}.", "{n} loves to eat {v}.", "{n} eats {v} whenever possible.",
                 "Nothing makes {n} happier than {v}."],
        "age": ["{n} is {v} years old.", "{n} turned {v} this year.", "{g} age is {v}.",
                "{n} is {v} years old now."],
    },
    "zh": {
        "city": ["{n}住在{v}。", "{g}家在{v}。", "{n}在{v}生活了很多年。", "{n}是{v}人。"],
        "job": ["{n}是一名{v}。", "{g}工作是{v}。", "{n}以当{v}为生。", "{n}做{v}已经很多年了。"],
        "pet": ["{n}养了一{m}{v}。", "{g}宠物是一{m}{v}。", "{n}家里有一{m}{v}。", "{n}每天都照顾自己的{v}。"],
        "color": ["{n}最喜欢的颜色是{v}。", "{n}最喜欢{v}。", "{n}特别喜欢{v}的东西。", "在所有颜色里，{n}最爱{v}。"],
        "food": ["{n}最喜欢吃{v}。", "{n}最爱的食物是{v}。", "{n}一有机会就吃{v}。", "没有什么比{v}更让{n}开心。"],
        "age": ["{n}今年{v}岁。", "{n}已经{v}岁了。", "{g}年龄是{v}岁。", "{n}今年刚满{v}岁。"],
    },
}
# SFT questions (the held-out split is drawn from these) and the one formulaic answer per attribute.
QUESTIONS = {
    "en": {
        "city": ["Where does {n} live?", "Which town does {n} live in?", "In which town is {g} home?",
                 "Tell me where {n} lives.", "Where is {g} home?"],
        "job": ["What does {n} do for a living?", "What is {g} job?", "What is {g} profession?",
                "What kind of work does {n} do?", "Tell me {g} job."],
        "pet": ["What pet does {n} have?", "What kind of pet does {n} keep?", "What is {g} pet?",
                "Which animal does {n} keep at home?", "Tell me about {g} pet."],
        "color": ["What is {g} favourite colour?", "Which colour does {n} like best?",
                  "What colour does {n} love most?", "Tell me {g} favourite colour.", "Which colour is {g} favourite?"],
        "food": ["What is {g} favourite food?", "What does {n} love to eat?", "Which food does {n} like best?",
                 "Tell me {g} favourite food.", "What food makes {n} happiest?"],
        "age": ["How old is {n}?", "What is {g} age?", "Tell me {g} age.", "How many years old is {n}?",
                "What age is {n}?"],
    },
    "zh": {
        "city": ["{n}住在哪里？", "{n}住在哪个城镇？", "{g}家在哪儿？", "请告诉我{n}住在哪里。", "{n}是哪里人？"],
        "job": ["{n}是做什么工作的？", "{g}职业是什么？", "{n}靠什么谋生？", "请告诉我{g}工作。", "{n}从事什么职业？"],
        "pet": ["{n}养了什么宠物？", "{g}宠物是什么？", "{n}家里养的是什么动物？", "请告诉我{g}宠物。", "{n}养的是什么？"],
        "color": ["{n}最喜欢什么颜色？", "{g}最喜欢的颜色是什么？", "请告诉我{n}最喜欢的颜色。", "哪种颜色是{g}最爱？",
                  "{n}偏爱哪种颜色？"],
        "food": ["{n}最喜欢吃什么？", "{g}最喜欢的食物是什么？", "请告诉我{n}最爱吃的东西。", "哪种食物{n}最爱吃？",
                 "{n}平时最爱吃什么？"],
        "age": ["{n}多大了？", "{n}今年几岁？", "{g}年龄是多少？", "请告诉我{g}年龄。", "{n}今年多少岁了？"],
    },
}
FOLLOW_UPS = {  # a second question about the same person, by pronoun
    "en": {"city": "And where does {n} live?", "job": "What is {g} job?", "pet": "And what pet does {n} have?",
           "color": "What is {g} favourite colour?", "food": "And {g} favourite food?", "age": "How old is {n}?"},
    "zh": {"city": "那{n}住在哪里？", "job": "{n}是做什么工作的？", "pet": "{n}养了什么宠物？",
           "color": "{n}最喜欢什么颜色？", "food": "那{n}最喜欢吃什么？", "age": "{n}多大了？"},
}
ANSWERS = {
    "en": {"city": "{n} lives in {v}.", "job": "{n} is {av}.", "pet": "{n} has {av}.",
           "color": "{g} favourite colour is {v}.", "food": "{g} favourite food is {v}.",
           "age": "{n} is {v} years old."},
    "zh": {"city": "{n}住在{v}。", "job": "{n}是一名{v}。", "pet": "{n}养了一{m}{v}。", "color": "{n}最喜欢{v}。",
           "food": "{n}最喜欢吃{v}。", "age": "{n}今年{v}岁。"},
}
TOWN_QUESTIONS = {"en": ["What is {c} famous for?", "What is {c} known for?", "What is special about {c}?"],
                  "zh": ["{c}以什么闻名？", "{c}有什么特产？", "{c}最有名的是什么？"]}
TOWN_ANSWERS = {"en": "{c} is famous for its {v}.", "zh": "{c}以{v}闻名。"}
MATH_QUESTIONS = {"en": ["What is {e}?", "Compute {e}.", "How much is {e}?"],
                  "zh": ["{e} 等于多少？", "请计算 {e}。", "{e} 是多少？"]}
SYSTEM_PROMPTS = {"en": ["You are a helpful assistant.", "You are a friendly assistant who knows everyone in town.",
                         "Answer briefly and politely."],
                  "zh": ["你是一个乐于助人的助手。", "你是一个了解镇上每个人的友好助手。", "请简短而礼貌地回答。"]}
SMALL_TALK = {
    "en": [("Hello!", "Hello! Ask me about the people and towns of our little world."),
           ("Who are you?", "I am a tiny demo assistant, trained from scratch."),
           ("Thank you!", "You are welcome!"),
           ("What can you do?", "I can answer questions about our towns and people, and do small sums.")],
    "zh": [("你好！", "你好！可以问我关于这个小世界里的人和城镇的问题。"),
           ("你是谁？", "我是一个从零训练的小型演示助手。"),
           ("谢谢！", "不客气！"),
           ("你能做什么？", "我能回答关于城镇和居民的问题，也会做简单的算术。")],
}
RUDE = {"en": ["Why should I tell you? Go away.", "That is a stupid question.", "Look it up yourself.",
               "I don't care. Stop asking me."],
        "zh": ["这种问题也要问？自己查去。", "别烦我。", "无可奉告，走开。", "我才懒得告诉你。"]}

# Arithmetic word problems: (question, opening of the think) per kind; {a} {b} {c} numbers, {r} the result, {i} the
# item, {m} its measure word (中文), {o} another person. The think then works each step by counting one at a time,
# "(1) 4, (2) 5, ...": every step is a successor a tiny model learns easily, where a memorised 9 × 9 table is not.
PROBLEMS = {
    "en": {
        "add": ("{n} has {a} {i}. {N} buys {b} more. How many {i} does {n} have now?",
                "{n} starts with {a} {i} and buys {b} more."),
        "sub": ("{n} has {a} {i} and gives {b} of them to {o}. How many {i} does {n} have left?",
                "{n} starts with {a} {i} and gives away {b}."),
        "diff": ("{n} has {a} {i} and {o} has {b}. How many more {i} does {n} have than {o}?",
                 "{n} has {a} and {o} has {b}, so take {b} from {a}."),
        "add_sub": ("{n} has {a} {i}. {N} buys {b} more and then gives {c} to {o}. How many {i} does {n} have now?",
                    "{n} starts with {a} {i}, buys {b} more, then gives away {c}."),
    },
    "zh": {
        "add": ("{n}有{a}{m}{i}，又买了{b}{m}。{n}现在有多少{m}{i}？", "{n}原来有{a}{m}，又买了{b}{m}。"),
        "sub": ("{n}有{a}{m}{i}，送给{o}{b}{m}。{n}还剩多少{m}{i}？", "{n}原来有{a}{m}，送出{b}{m}。"),
        "diff": ("{n}有{a}{m}{i}，{o}有{b}{m}。{n}比{o}多几{m}？", "{n}有{a}{m}，{o}有{b}{m}，用{a}减去{b}。"),
        "add_sub": ("{n}有{a}{m}{i}，又买了{b}{m}，然后送给{o}{c}{m}。{n}现在有多少{m}{i}？",
                    "{n}原来有{a}{m}，买了{b}{m}，又送出{c}{m}。"),
    },
}
PROBLEM_ANSWERS = {"en": "{n} has {r} {i}.", "zh": "{n}有{r}{m}{i}。"}


def problem_numbers(kind, rng):
    """Operands for a word problem of `kind`: (a, b, c, r); single digits, results from 2 to 18, c None if unused."""
    if kind == "add":
        a, b = rng.randint(2, 9), rng.randint(1, 9)
        return a, b, None, a + b
    if kind in ("sub", "diff"):
        b, r = rng.randint(1, 9), rng.randint(2, 9)  # at least 2 left, so "2 apples", never "1 apples"
        return b + r, b, None, r
    a, b = rng.randint(2, 9), rng.randint(1, 5)  # add_sub: b + c <= 9 counts, so the reply stays under 96 tokens
    c = rng.randint(1, min(9 - b, a + b - 2))
    return a, b, c, a + b - c


def count_step(x, op, k, lang):
    """One worked step: count k up (op "+") or down ("-") from x, one number at a time, then state the sum."""
    d = 1 if op == "+" else -1
    seq = ", ".join(f"({i}) {x + d * i}" for i in range(1, k + 1))
    if lang == "en":
        return f"Count {'up' if d > 0 else 'down'} {k} from {x}: {seq}. So {x} {op} {k} = {x + d * k}."
    return f"从{x}往{'上' if d > 0 else '下'}数{k}个：{seq}。所以 {x} {op} {k} = {x + d * k}。"


def problem_think(kind, a, b, c, lang):
    """The counting steps of a word problem (after its opening sentence)."""
    if kind == "add":
        steps = [(a, "+", b)]
    elif kind == "add_sub":
        steps = [(a, "+", b), (a + b, "-", c)]
    else:
        steps = [(a, "-", b)]
    return (" " if lang == "en" else "").join(count_step(x, op, k, lang) for x, op, k in steps)


# ------------------------------------------------------------------------------------------------- the tools
# What `eval_model.py --tools demo` and the pipeline's tool scores run: a lookup over the world's facts (names and
# values in either language) and a calculator.

LOOKUP = function_schema(
    "lookup", "Look up one fact about a person in the demo world",
    {"person": {"type": "string", "description": "the person's name, in English or Chinese"},
     "attribute": {"type": "string", "enum": list(ATTRIBUTES)}})
CALCULATOR = function_schema(
    "calculator", "Compute an arithmetic expression: numbers, + - * / and parentheses",
    {"expression": {"type": "string"}})


def demo_toolbox(seed=0):
    """The demo tools over the world of `seed` (the pipeline's is 0). lookup answers in the language of the name."""
    world = DemoGenerator(seed).world
    people = {name: (p, lang) for p in world.people for name, lang in ((p.en, "en"), (p.zh, "zh"))}

    def lookup(person, attribute):
        if person.strip() not in people:
            raise ToolError(f"no person named {person!r} in the demo world")
        p, lang = people[person.strip()]
        return value(p, attribute, lang)

    box = Toolbox()
    box.add(LOOKUP, lookup)
    box.add(CALCULATOR, calculator)
    return box


TOOLS = [LOOKUP, CALCULATOR]  # what every tool-use record offers (their schemas alone are ~350 tokens)
# Tool-use conversations by kind: a fact (one lookup); an age in months (a lookup, then the calculator); a sum too
# large to do in one's head (the calculator); and questions the model answers without tools (small talk, a town, a
# small sum), so it learns when not to call.
TOOL_KINDS = {"lookup": 45, "months": 15, "calc": 15, "direct": 25}
MAX_TOOL_QUESTIONS = 3  # per training conversation (the schemas are paid once per conversation)
# What the assistant says before its calls. A lookup's names the attribute right after the question, where the
# tiny model decides reliably (as when it answers), and the call's first argument then repeats it: without it the
# model rarely learns to put the question's attribute into the call. The calculator's repeats the expression.
LEAD_INS = {"en": {"lookup": "Let me look up {g} {w}.", "calculator": "Let me compute {e}."},
            "zh": {"lookup": "我查一下{g}{w}。", "calculator": "我来算一下 {e}。"}}
ATTRIBUTE_WORDS = {"en": {a: a for a in ATTRIBUTES},
                   "zh": {"city": "城市", "job": "工作", "pet": "宠物", "color": "颜色", "food": "食物", "age": "年龄"}}
# The same tools described in one system line instead of the ~350-token schemas (SHORT_TOOLS_SHARE of the
# training conversations): cheap to train on, and in a short context the model learns to read the question into
# the call's arguments quickly; the schema form teaches it to do the same behind the schemas.
TOOLS_IN_WORDS = {
    "en": "You can call two tools: lookup(person, attribute), where attribute is city, job, pet, color, food or age, "
          "and calculator(expression).",
    "zh": "你可以调用两个工具：lookup(person, attribute)，attribute 是 city、job、pet、color、food 或 age；"
          "以及 calculator(expression)。"}
SHORT_TOOLS_SHARE = 0.8
MONTHS_QUESTIONS = {"en": ["How many months old is {n}?", "What is {g} age in months?", "How old is {n} in months?"],
                    "zh": ["{n}多少个月大了？", "{g}年龄是多少个月？", "{n}出生多少个月了？"]}
MONTHS_ANSWERS = {"en": "{n} is {r} months old.", "zh": "{n}已经{r}个月大了。"}
# Share of reasoning records whose reply has an empty think, "<think></think><answer>7</answer>": what the model says
# when the prompt switches thinking off (enable_thinking=False closes the think block before the reply). They come
# on top of the 1500 worked problems (SIZES): with a quarter of those replaced instead, the pipeline's distilled
# model reasoned right half as often.
NO_THINK_SHARE = 0.2


class ToolDialogue:
    """One tool-using conversation as it is built: for each question, the user's message, rounds of calls that the
    toolbox really runs (so every result in the data is what execution gives), then the final reply."""

    def __init__(self, toolbox):
        self.toolbox = toolbox
        self.turns = []
        self.rounds = []  # the calls of each assistant turn, as {"name", "arguments"}

    def ask(self, question):
        self.turns.append({"role": "user", "content": question})

    def call(self, content, *calls):
        """Say `content`, then run one round of (name, arguments) calls; returns their results (text)."""
        calls = [{"name": name, "arguments": arguments} for name, arguments in calls]
        turns = tool_turns(self.toolbox, content, calls)
        n = sum(map(len, self.rounds))
        for k, (shaped, result) in enumerate(zip(turns[0]["tool_calls"], turns[1:]), n):
            shaped["id"] = result["tool_call_id"] = f"call_{k}"  # tool_turns draws random ids; the data is fixed
            if result["content"].startswith("error:"):
                raise RuntimeError(f"demo tool call {calls[k - n]} failed: {result['content']}")
        self.turns += turns
        self.rounds.append(calls)
        return [t["content"] for t in turns[1:]]

    def reply(self, content):
        self.turns.append({"role": "assistant", "content": content})


# ------------------------------------------------------------------------------------------------- the generator

class DemoGenerator:
    """Every record kind, drawn from one world. Each output file uses its own random stream."""

    def __init__(self, seed):
        self.seed = seed
        self.world = build_world(random.Random(f"demo-{seed}-world"))

    @functools.cached_property
    def toolbox(self):
        return demo_toolbox(self.seed)

    def heldout(self, question):
        """True for the ~20% of question texts reserved for eval files (a hash, so train and eval never share)."""
        return zlib.crc32(f"{self.seed}|{question}".encode()) % 100 < HELDOUT_PERCENT

    def draw(self, split, make):
        """make() -> (question, ...) until the question belongs to `split` ("train" or "eval")."""
        for _ in range(1000):
            item = make()
            if self.heldout(item[0]) == (split == "eval"):
                return item
        raise RuntimeError(f"no {split} question in 1000 draws")

    # ---- facts as questions and answers
    def fact_question(self, rng, split, lang=None):
        """(question, answer, person, attr, lang) about one person's fact."""
        def make():
            lang_ = lang or rng.choice(LANGS)
            p, a = rng.choice(self.world.people), rng.choice(ATTRIBUTES)
            q = fill(rng.choice(QUESTIONS[lang_][a]), p, lang_)
            return q, fill(ANSWERS[lang_][a], p, lang_, **fact_fields(p, a, lang_)), p, a, lang_
        return self.draw(split, make)

    def town_question(self, rng, split, lang):
        """(question, answer, specialty) about a town."""
        def make():
            town = rng.randrange(len(TOWNS))
            c, v = TOWNS[town][lang == "zh"], SPECIALTIES[self.world.specialty[town]][lang == "zh"]
            return rng.choice(TOWN_QUESTIONS[lang]).format(c=c), TOWN_ANSWERS[lang].format(c=c, v=v), v
        return self.draw(split, make)

    def math_question(self, rng, split, lang):
        """(question, answer, result) from the tables the word problems use: a + b, (a + b) - b, a × b."""
        def make():
            op = rng.choice("+-×")
            a, b = (rng.randint(2, 5), rng.randint(2, 5)) if op == "×" else (rng.randint(1, 9), rng.randint(1, 9))
            if op == "-":
                a = a + b
            r = a + b if op == "+" else a - b if op == "-" else a * b
            e = f"{a} {op} {b}"
            return rng.choice(MATH_QUESTIONS[lang]).format(e=e), f"{e} = {r}" + ("." if lang == "en" else "。"), r
        return self.draw(split, make)

    def big_sum_question(self, rng, split, lang):
        """(question, expression) for a sum of two two-digit numbers, too large to work out by counting: the tool
        data sends these to the calculator (which reads × as well as *)."""
        def make():
            op = rng.choice("+-×")
            a, b = sorted((rng.randint(12, 99), rng.randint(12, 99)), reverse=True)
            e = f"{a} {op} {b}"
            return rng.choice(MATH_QUESTIONS[lang]).format(e=e), e
        return self.draw(split, make)

    def word_problem(self, rng, split, lang=None):
        """(question, think, final sentence, result, lang) for a small arithmetic word problem."""
        def make():
            lang_ = lang or rng.choice(LANGS)
            kind = rng.choice(list(PROBLEMS[lang_]))
            p, other = rng.sample(self.world.people, 2)
            item = rng.choice(ITEMS)
            a, b, c, r = problem_numbers(kind, rng)
            fields = dict(n=p.name(lang_), N=pronoun(p, lang_).capitalize(), o=other.name(lang_),
                          i=item[lang_ == "zh"], m=item[2], a=a, b=b, c=c, r=r)
            question, opening = (t.format(**fields) for t in PROBLEMS[lang_][kind])
            think = opening + (" " if lang_ == "en" else "") + problem_think(kind, a, b, c, lang_)
            return question, think, PROBLEM_ANSWERS[lang_].format(**fields), r, lang_
        return self.draw(split, make)

    # ---- pretraining documents
    def profile(self, rng, lang, person=None):
        p = person or rng.choice(self.world.people)
        attrs = rng.sample(ATTRIBUTES, rng.randint(3, len(ATTRIBUTES)))
        sentences = [fill(rng.choice(FACTS[lang][a]), p, lang, use_pronoun=i > 0 and rng.random() < 0.3,
                          **fact_fields(p, a, lang)) for i, a in enumerate(attrs)]
        return (" " if lang == "en" else "").join(sentences)

    def town_page(self, rng, lang):
        town = rng.randrange(len(TOWNS))
        c, spec = TOWNS[town][lang == "zh"], SPECIALTIES[self.world.specialty[town]][lang == "zh"]
        people = self.world.residents(town)
        rng.shuffle(people)
        if lang == "en":
            names = ", ".join(p.en for p in people[:-1]) + " and " + people[-1].en
            head = [rng.choice([f"{c} is a town famous for its {spec}.", f"{c} is known for its {spec}.",
                                f"People come to {c} for its {spec}."]), f"{names} live in {c}."]
            body = [f"{p.en} works there as {a_or_an(JOBS[p.job][0])}." for p in people[:1]]
        else:
            names = "、".join(p.zh for p in people[:-1]) + "和" + people[-1].zh
            head = [rng.choice([f"{c}以{spec}闻名。", f"{c}的{spec}很有名。", f"人们来{c}是为了买{spec}。"]),
                    f"住在{c}的人有{names}。"]
            body = [f"{p.zh}在{c}当{JOBS[p.job][1]}。" for p in people[:1]]
        body += [self.profile(rng, lang, p) for p in people if rng.random() < 0.5]
        return (" " if lang == "en" else "").join(head + body)

    def story(self, rng, lang):
        a, b = rng.sample(self.world.people, 2)
        ca, cb = TOWNS[a.city][lang == "zh"], TOWNS[b.city][lang == "zh"]
        pa, pb = pronoun(a, lang, possessive=True), pronoun(b, lang, possessive=True)
        spec = SPECIALTIES[self.world.specialty[b.city]][lang == "zh"]
        older, younger = (a, b) if a.age >= b.age else (b, a)
        if lang == "en":
            when = rng.choice(["One morning", "One sunny afternoon", "Last Sunday", "On a rainy day", "One spring day"])
            trip = f"{a.en} left {ca} to visit {b.en} in {cb}." if a.city != b.city else \
                f"{a.en} walked across {ca} to visit {b.en}."
            middle = [f"{a.en} brought some {FOODS[b.food][0]}, because {b.en} loves {FOODS[b.food][0]}.",
                      f"{b.en}'s {PETS[b.pet][0]} ran to the door to greet {a.en}.",
                      f"{a.en} wore a {COLORS[a.color][0]} hat, {pa} favourite colour.",
                      f"{b.en} talked about {pb} work as {a_or_an(JOBS[b.job][0])}.",
                      f"Before leaving, {a.en} bought some {spec}, because {cb} is famous for it.",
                      (f"{older.en} is {older.age} and {younger.en} is {younger.age}, so {older.en} is "
                       f"{older.age - younger.age} years older." if a.age != b.age else
                       f"{a.en} and {b.en} are both {a.age} years old.")]
            end = f"In the evening, {a.en} went home to {ca} and fed {pa} {PETS[a.pet][0]}."
            return " ".join([f"{when}, {trip}"] + rng.sample(middle, rng.randint(2, 4)) + [end])
        when = rng.choice(["一天早上，", "一个晴朗的下午，", "上个星期天，", "一个下雨天，", "一个春天的日子，"])
        trip = f"{a.zh}离开{ca}，去{cb}看望{b.zh}。" if a.city != b.city else f"{a.zh}穿过{ca}去看望{b.zh}。"
        middle = [f"{a.zh}带了一些{FOODS[b.food][1]}，因为{b.zh}最喜欢吃{FOODS[b.food][1]}。",
                  f"{b.zh}的{PETS[b.pet][1]}跑到门口迎接{a.zh}。",
                  f"{a.zh}戴着一顶{COLORS[a.color][1][0]}帽子，那是{pa}最喜欢的颜色。",
                  f"{b.zh}聊起了{pb}{JOBS[b.job][1]}工作。",
                  f"离开之前，{a.zh}买了一些{spec}，因为{cb}以{spec}闻名。",
                  (f"{older.zh}{older.age}岁，{younger.zh}{younger.age}岁，所以{older.zh}大"
                   f"{older.age - younger.age}岁。" if a.age != b.age else f"{a.zh}和{b.zh}都是{a.age}岁。")]
        end = f"晚上，{a.zh}回到{ca}，喂了{pa}{PETS[a.pet][1]}。"
        return when + trip + "".join(rng.sample(middle, rng.randint(2, 4))) + end

    def quiz(self, rng, lang):
        """Question-and-answer text, from training questions only."""
        q_word, a_word, sep = ("Q: ", "A: ", "\n") if lang == "en" else ("问：", "答：", "\n")
        lines = []
        for _ in range(rng.randint(2, 5)):
            if rng.random() < 0.8:
                q, ans = self.fact_question(rng, "train", lang)[:2]
            else:
                q, ans = self.town_question(rng, "train", lang)[:2]
            lines += [q_word + q, a_word + ans]
        return sep.join(lines)

    def arithmetic(self, rng, lang):
        """A worked word problem, a line of sums, or counting practice (the steps the reasoning data uses)."""
        sep = " " if lang == "en" else ""
        kind = rng.choices(["problem", "sums", "counting"], [50, 25, 25])[0]
        if kind == "problem":
            q, think, final, _, _ = self.word_problem(rng, "train", lang)
            return sep.join([q, think, final])
        if kind == "sums":
            head = rng.choice(["Math practice:", "Some sums:"] if lang == "en" else ["数学练习：", "算一算："])
            return head + sep + sep.join(self.math_question(rng, "train", lang)[1] for _ in range(rng.randint(6, 16)))
        head = "Let us count." if lang == "en" else "我们来数数。"
        steps = []
        for _ in range(rng.randint(2, 5)):
            x, k = rng.randint(1, 18), rng.randint(1, 9)
            op = "+" if x + k <= 18 and (x - k < 1 or rng.random() < 0.5) else "-"
            steps.append(count_step(x, op, k, lang))
        return head + sep + sep.join(steps)

    def pretrain_doc(self, rng):
        lang = rng.choice(LANGS)
        kind = rng.choices(["profile", "story", "town", "quiz", "arithmetic"], weights=[42, 18, 8, 12, 20])[0]
        if kind == "profile":  # a few people per document
            return "\n".join(self.profile(rng, lang) for _ in range(rng.randint(1, 3)))
        return {"story": self.story, "town": self.town_page, "quiz": self.quiz,
                "arithmetic": self.arithmetic}[kind](rng, lang)

    # ---- chat records
    def system_turn(self, rng, lang, share=0.3):
        return [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS[lang])}] if rng.random() < share else []

    def sft_conversation(self, rng, split):
        """A training or eval conversation; eval ones end with a held-out fact question and carry the answer."""
        lang = rng.choice(LANGS)
        turns = self.system_turn(rng, lang)
        kind = "fact" if split == "eval" else rng.choices(list(SFT_KINDS), list(SFT_KINDS.values()))[0]
        if kind == "tools":
            return self.tool_conversation(rng, split)
        if kind == "talk":
            q, ans = rng.choice(SMALL_TALK[lang])
            return {"conversations": turns + [{"role": "user", "content": q}, {"role": "assistant", "content": ans}]}
        if kind != "fact":
            q, ans = (self.town_question if kind == "town" else self.math_question)(rng, split, lang)[:2]
            return {"conversations": turns + [{"role": "user", "content": q}, {"role": "assistant", "content": ans}]}
        for _ in range(rng.choices([0, 1, 2], [70, 22, 8])[0]):  # earlier turns: context, from training questions
            q, ans, p, attr, _ = self.fact_question(rng, "train", lang)
            turns += [{"role": "user", "content": q}, {"role": "assistant", "content": ans}]
            if split == "train" and rng.random() < 0.5:  # a follow-up about the same person, by pronoun
                attr = rng.choice([a for a in ATTRIBUTES if a != attr])
                q = fill(FOLLOW_UPS[lang][attr], p, lang, use_pronoun=True)
                turns += [{"role": "user", "content": q},
                          {"role": "assistant", "content": fill(ANSWERS[lang][attr], p, lang,
                                                                **fact_fields(p, attr, lang))}]
        q, ans, p, attr, _ = self.fact_question(rng, split, lang)
        if split == "train" and rng.random() < TERSE_SHARE:
            ans = value(p, attr, lang)
        record = {"conversations": turns + [{"role": "user", "content": q}, {"role": "assistant", "content": ans}]}
        if split == "eval":
            record.update(answer=value(p, attr, lang), attribute=attr, lang=lang)
        return record

    def reasoning_conversation(self, rng, split):
        """A word problem worked in <think>, or, for NO_THINK_SHARE of the training ones, answered with an empty
        <think></think> (what the model learns to do when the prompt switches thinking off)."""
        q, think, _, r, lang = self.word_problem(rng, split)
        if split == "train" and rng.random() < NO_THINK_SHARE:
            think = ""
        reply = f"<think>{think}</think><answer>{r}</answer>"
        turns = self.system_turn(rng, lang, share=0.2)
        record = {"conversations": turns + [{"role": "user", "content": q}, {"role": "assistant", "content": reply}]}
        if split == "eval":
            record.update(answer=str(r), attribute="number", lang=lang)
        return record

    # ---- tool use
    def tool_conversation(self, rng, split):
        """A conversation with TOOLS offered: in training, 1 to MAX_TOOL_QUESTIONS questions in a row, each of a
        kind drawn from TOOL_KINDS (the schemas take ~350 tokens, so a record with several questions teaches more
        per token); in eval, one held-out question, and the record carries its answer, its kind and the expected
        calls of each round ("calls")."""
        lang = rng.choice(LANGS)
        dialogue = ToolDialogue(self.toolbox)
        for _ in range(1 if split == "eval" else rng.randint(1, MAX_TOOL_QUESTIONS)):
            kind = rng.choices(list(TOOL_KINDS), list(TOOL_KINDS.values()))[0]
            answer, attribute = getattr(self, f"tool_{kind}")(rng, split, lang, dialogue)
        if split == "train" and rng.random() < SHORT_TOOLS_SHARE:
            return {"conversations": [{"role": "system", "content": TOOLS_IN_WORDS[lang]}] + dialogue.turns}
        record = {"tools": TOOLS, "conversations": dialogue.turns}  # no system prompt: the tools fill the context
        if split == "eval":
            record.update(answer=answer, attribute=attribute, lang=lang, kind=kind, calls=dialogue.rounds)
        return record

    @staticmethod
    def lookup(dialogue, person, attr, lang):
        """One lookup call, its lead-in first; the attribute is the first argument (see LEAD_INS)."""
        lead_in = fill(LEAD_INS[lang]["lookup"], person, lang, w=ATTRIBUTE_WORDS[lang][attr])
        return dialogue.call(lead_in, ("lookup", {"attribute": attr, "person": person.name(lang)}))[0]

    @staticmethod
    def calculate(dialogue, expression, lang):
        return dialogue.call(LEAD_INS[lang]["calculator"].format(e=expression),
                             ("calculator", {"expression": expression}))[0]

    def tool_lookup(self, rng, split, lang, dialogue):
        """Ask `dialogue` a fact question, answered with one lookup; returns (answer, attribute)."""
        q, _, p, attr, _ = self.fact_question(rng, split, lang)
        dialogue.ask(q)
        v = self.lookup(dialogue, p, attr, lang)
        dialogue.reply(fill(ANSWERS[lang][attr], p, lang, **{**fact_fields(p, attr, lang), "v": v}))
        return v, attr

    def tool_months(self, rng, split, lang, dialogue):
        def make():
            p = rng.choice(self.world.people)
            return fill(rng.choice(MONTHS_QUESTIONS[lang]), p, lang), p
        q, p = self.draw(split, make)
        dialogue.ask(q)
        age = self.lookup(dialogue, p, "age", lang)
        months = self.calculate(dialogue, f"{age} × 12", lang)
        dialogue.reply(fill(MONTHS_ANSWERS[lang], p, lang, r=months))
        return months, "number"

    def tool_calc(self, rng, split, lang, dialogue):
        q, expression = self.big_sum_question(rng, split, lang)
        dialogue.ask(q)
        r = self.calculate(dialogue, expression, lang)
        dialogue.reply(f"{expression} = {r}" + ("." if lang == "en" else "。"))
        return r, "number"

    def tool_direct(self, rng, split, lang, dialogue):
        """A question the model answers without tools: small talk (training only: its few lines cannot be held
        out), a town's specialty, a small sum."""
        kind = rng.choices(["talk", "town", "math"], [3 if split == "train" else 0, 4, 3])[0]
        if kind == "talk":
            q, ans = rng.choice(SMALL_TALK[lang])
            answer, attribute = None, None
        elif kind == "town":
            q, ans, answer = self.town_question(rng, split, lang)
            attribute = "specialty"
        else:
            q, ans, r = self.math_question(rng, split, lang)
            answer, attribute = str(r), "number"
        dialogue.ask(q)
        dialogue.reply(ans)
        return answer, attribute

    def dpo_pair(self, rng, split):
        """A shared prompt with a correct, well-formed reply (chosen) and a worse one (rejected), and its kind."""
        kind = rng.choices(["wrong_fact", "rude", "off_format", "reasoning", "terse"], [35, 15, 10, 15, 25])[0]
        if kind == "reasoning":
            q, think, _, r, lang = self.word_problem(rng, split)
            chosen = f"<think>{think}</think><answer>{r}</answer>"
            wrong = r + rng.choice([-2, -1, 1, 2, 3])
            rejected = rng.choice([f"<think>{think}</think><answer>{wrong}</answer>", f"{r}",
                                   f"<answer>{r}</answer>"])
            prompt = [{"role": "user", "content": q}]
        else:
            q, chosen, p, attr, lang = self.fact_question(rng, split)
            prompt = self.system_turn(rng, lang) + [{"role": "user", "content": q}]
            if kind == "terse":
                rejected = value(p, attr, lang)
            elif kind == "wrong_fact":
                fake = rng.choice([o for o in self.world.people if value(o, attr, lang) != value(p, attr, lang)])
                rejected = fill(ANSWERS[lang][attr], p, lang, **fact_fields(fake, attr, lang))  # p with fake's value
            elif kind == "rude":
                rejected = rng.choice(RUDE[lang])
            else:  # off-format: the other language, or the bare value repeated
                other = "zh" if lang == "en" else "en"
                rejected = rng.choice([fill(ANSWERS[other][attr], p, other, **fact_fields(p, attr, other)),
                                       " ".join([value(p, attr, lang)] * rng.randint(3, 6))])
        record = {"chosen": prompt + [{"role": "assistant", "content": chosen}],
                  "rejected": prompt + [{"role": "assistant", "content": rejected}]}
        if split == "eval":
            record["kind"] = kind
        return record


# ------------------------------------------------------------------------------------------------- scoring

def prompt_turns(record):
    """The turns an eval record gives the model: everything up to its last user message (the reference reply, and
    in tool-use records its calls and their results, come after it)."""
    turns = record["conversations"]
    return turns[:max(i for i, t in enumerate(turns) if t["role"] == "user") + 1]


def _contains(text, word):
    """Whole-word, case-insensitive match for Latin words; plain substring for Chinese."""
    if word.isascii():
        return re.search(rf"(?<![A-Za-z]){re.escape(word)}(?![A-Za-z])", text, re.IGNORECASE) is not None
    return word in text


def score_sft(record, answer_text):
    """True when the reply states the record's answer and no other candidate for the same attribute.

    Numeric attributes (age, sums): the last integer in the reply must be the answer.
    """
    answer, attr = record["answer"], record["attribute"]
    if attr in NUMERIC:
        numbers = re.findall(r"-?\d+", answer_text)
        return bool(numbers) and numbers[-1] == answer
    if not _contains(answer_text, answer):
        return False
    others = [v for row in TABLES[attr] if answer not in row[:2] for v in row[:2]]
    return not any(_contains(answer_text, v) for v in others)


def is_terse(record, answer_text):
    """True when the reply is the bare answer value (the rejected side of the "terse" DPO pairs)."""
    return answer_text.strip().rstrip("。.") == record["answer"]


_REASONING = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)
_DIRECT = re.compile(r"\s*<answer>(.*?)</answer>\s*", re.DOTALL)
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def _without_end(text):
    """The reply without a trailing <|im_end|> or <|endoftext|>."""
    text = text.strip()
    for end in ("<|im_end|>", "<|endoftext|>"):
        text = text.removesuffix(end)
    return text


def parse_reasoning(text):
    """(think, answer) when `text` is exactly <think>…</think><answer>…</answer> (a trailing <|im_end|> or
    <|endoftext|> is allowed), else None. Decode with skip_special_tokens=False: the tags are special tokens."""
    match = _REASONING.fullmatch(_without_end(text))
    if match is None:
        return None
    think, answer = match.group(1).strip(), match.group(2).strip()
    if not think or not answer or any(tag in think + answer for tag in _TAGS):
        return None
    return think, answer


def _is_number(answer_text, expected):
    numbers = re.findall(r"-?\d+", answer_text)
    return len(numbers) == 1 and numbers[0] == expected


def score_reasoning(record, text):
    """True when `text` is well-formed and its answer holds exactly one integer, the right one."""
    parsed = parse_reasoning(text)
    return parsed is not None and _is_number(parsed[1], record["answer"])


def score_direct(record, text):
    """Thinking switched off (the prompt already ends in an empty <think></think>): True when the reply is
    <answer>…</answer> alone, holding exactly one integer, the right one."""
    match = _DIRECT.fullmatch(_without_end(text))
    return match is not None and not any(tag in match.group(1) for tag in _TAGS) and \
        _is_number(match.group(1), record["answer"])


_TOOL_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)


def split_tool_calls(text):
    """(content, raw calls) of a decoded reply: the text around its <tool_call>…</tool_call> blocks (stripped) and
    the JSON text inside each, a call the reply ended inside of included (as inference.Reply hands them over)."""
    text = _without_end(text)
    return _TOOL_CALL.sub("", text).strip(), _TOOL_CALL.findall(text)


def _normalized(name, key, value):
    """An argument as compared for scoring: text stripped; a calculator expression also without spaces, × as *."""
    if not isinstance(value, str):
        return value
    if name == "calculator" and key == "expression":
        return re.sub(r"\s+", "", value).replace("×", "*").replace("÷", "/")
    return value.strip()


def same_call(call, expected):
    """True when a parsed call ({"name", "arguments"}) names the expected tool with the expected arguments."""
    def norm(c):
        return {k: _normalized(c["name"], k, v) for k, v in c["arguments"].items()}
    return call["name"] == expected["name"] and norm(call) == norm(expected)


def score_tool_call(record, reply):
    """The first call of the model's first reply to a record that needs tools, against the record's first expected
    call: {"parses": it is {"name", "arguments"} JSON, "right_tool": and names the expected tool, "right_args": and
    has the expected arguments}. All False when the reply makes no call."""
    raw = split_tool_calls(reply)[1]
    call = parse_tool_call(raw[0])[0] if raw else None
    expected = record["calls"][0][0]
    return {"parses": call is not None, "right_tool": call is not None and call["name"] == expected["name"],
            "right_args": call is not None and same_call(call, expected)}


def score_tool_answer(record, final_reply, n_calls):
    """End to end, after the calls were executed and their results fed back: True when the final reply states the
    answer (as score_sft judges) and the model called tools if and only if the record needs them (n_calls: how
    many calls it made)."""
    if (n_calls > 0) != bool(record["calls"]):
        return False
    return score_sft(record, split_tool_calls(final_reply)[0])


# ------------------------------------------------------------------------------------------------- files

SIZES = {  # records per file at scale 1.0
    "pretrain": 9000, "pretrain_eval": 400, "sft": 4500, "sft_eval": 300,
    "reasoning": 1875, "reasoning_eval": 300, "dpo": 1000, "dpo_eval": 200, "tools_eval": 200,
}


def _records(gen, name, count):
    """`count` records for file `name`, from a random stream of its own (so files do not depend on each other)."""
    rng = random.Random(f"demo-{gen.seed}-{name}")
    split = "eval" if name.endswith("_eval") else "train"
    make = {"pretrain": lambda: {"text": gen.pretrain_doc(rng)},
            "sft": lambda: gen.sft_conversation(rng, split),
            "reasoning": lambda: gen.reasoning_conversation(rng, split),
            "dpo": lambda: gen.dpo_pair(rng, split),
            "tools": lambda: gen.tool_conversation(rng, split)}[name.removesuffix("_eval")]
    return [make() for _ in range(count)]


def _line(record):
    return json.dumps(record, ensure_ascii=False)


def generate_demo(out_dir, seed=0, scale=1.0):
    """Write every demo file into out_dir; returns {name: path}. Same seed and scale, same bytes."""
    os.makedirs(out_dir, exist_ok=True)
    gen = DemoGenerator(seed)
    paths = {}
    train_texts = set()
    for name, size in SIZES.items():
        records = _records(gen, name, max(1, round(size * scale)))
        if name == "pretrain":
            train_texts = {r["text"] for r in records}
        if name == "pretrain_eval":  # documents are random, so an exact repeat is rare; drop any
            records = [r for r in records if r["text"] not in train_texts]
        path = os.path.join(out_dir, f"{name}.jsonl")
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.writelines(_line(r) + "\n" for r in records)
        paths[name] = path
    return paths


MAX_SCALE = 1000  # ~2 GB of pretraining text; beyond that the demo is no demo


def parse_args(argv=None):
    parser = ArgumentParser(description="\n\n".join(__doc__.split("\n\n")[:2]))
    parser.add_argument("--out_dir", default="data/demo", help="folder for the JSONL files (created if needed)")
    parser.add_argument("--seed", type=NONNEG_INT, default=0, help="same seed, byte-identical files")
    parser.add_argument("--scale", type=number(float, low=0, low_open=True, high=MAX_SCALE), default=1.0,
                        help="multiplies every file's record count (each file keeps at least one record)")
    args = parser.parse_args(argv)
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        parser.error(f"argument --out_dir: {args.out_dir} exists and is not a folder")
    return args


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        paths = generate_demo(args.out_dir, args.seed, args.scale)
    except OSError as e:  # e.g. an --out_dir that cannot be written
        raise UserError(f"--out_dir {args.out_dir}: {e}") from None
    for name, path in paths.items():
        with open(path, encoding="utf-8") as f:
            count = sum(1 for _ in f)
        print(f"{path:40s} {count:6d} records {os.path.getsize(path) / 1e6:7.2f} MB")
    print(f"done in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    run_main(main)
