"""Offline math tasks: our own arithmetic word problems and reasoning-gym generators.

Arithmetic word problems are generated from a few templates with exact integer answers. A
task depends only on (seed, index, difficulty), so any slice can be regenerated identically.
difficulty (1-5) sets the size of the numbers and unlocks the multi-step templates.
"""
from __future__ import annotations

import random
from typing import Callable

from mappa_jax.data.task import MATH, DataError, Task

NAMES = ("Ada", "Bo", "Chen", "Dana", "Emil", "Fatima", "Gus", "Hana", "Ivan", "Jo")
ITEMS = ("apple", "pencil", "sticker", "marble", "notebook", "cookie", "bolt", "stamp")
MAGNITUDE = {1: 10, 2: 30, 3: 100, 4: 400, 5: 2000}

Template = Callable[[random.Random, int], tuple[str, int]]


def _change(rng: random.Random, hi: int) -> tuple[str, int]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    count, price = rng.randint(2, hi), rng.randint(1, hi)
    paid = count * price + rng.randint(0, hi)
    text = (f"{name} buys {count} {item}s at {price} dollars each and pays with {paid} dollars. "
            f"How many dollars of change does {name} get back?")
    return text, paid - count * price


def _sharing(rng: random.Random, hi: int) -> tuple[str, int]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    friends, each = rng.randint(2, 9), rng.randint(1, hi)
    start = friends * each + rng.randint(0, hi)
    bought = rng.randint(1, hi)
    text = (f"{name} has {start} {item}s, gives {each} to each of {friends} friends, and then "
            f"buys {bought} more. How many {item}s does {name} have now?")
    return text, start - friends * each + bought


def _production(rng: random.Random, hi: int) -> tuple[str, int]:
    item = rng.choice(ITEMS)
    rate, hours, days = rng.randint(2, hi), rng.randint(2, 12), rng.randint(2, 7)
    defective = rng.randint(0, rate * hours * days // 4)
    text = (f"A machine makes {rate} {item}s per hour and runs {hours} hours a day for {days} "
            f"days. {defective} of the {item}s are defective. How many good {item}s did it make?")
    return text, rate * hours * days - defective


def _savings_split(rng: random.Random, hi: int) -> tuple[str, int]:
    name = rng.choice(NAMES)
    people, share = rng.randint(2, 6), rng.randint(1, hi)
    weeks = rng.randint(2, 10)
    spent = rng.randint(0, hi)
    total = people * share + spent
    weekly, extra = divmod(total, weeks)
    text = (f"{name} saves {weekly} dollars every week for {weeks} weeks and also finds {extra} "
            f"dollars. After spending {spent} dollars on a gift, {name} splits the rest equally "
            f"among {people} people. How many dollars does each person get?")
    return text, share


def _ages(rng: random.Random, hi: int) -> tuple[str, int]:
    older, younger = rng.sample(NAMES, 2)
    young_age = rng.randint(1, hi)
    factor, years = rng.randint(2, 5), rng.randint(1, hi)
    text = (f"{older} is {factor} times as old as {younger}, who is {young_age}. What will the "
            f"sum of their ages be in {years} years?")
    return text, (factor + 1) * young_age + 2 * years


# (template, smallest difficulty that uses it)
TEMPLATES: tuple[tuple[Template, int], ...] = (
    (_change, 1), (_sharing, 1), (_production, 2), (_ages, 2), (_savings_split, 3))


def template_names() -> tuple[str, ...]:
    return tuple(template.__name__.lstrip("_") for template, _ in TEMPLATES)


def arithmetic_task(seed: int, index: int, difficulty: int = 2, templates: tuple[str, ...] = ()) -> Task:
    """The index-th arithmetic word problem of this seed and difficulty; `templates` (names, see
    `template_names`) narrows the problem families to those, else every one the difficulty unlocks."""
    if difficulty not in MAGNITUDE:
        raise DataError(f"arithmetic difficulty must be one of {sorted(MAGNITUDE)}, "
                        f"got {difficulty}")
    unknown = sorted(set(templates) - set(template_names()))
    if unknown:
        raise DataError(f"arithmetic templates {unknown} are unknown; known: {list(template_names())}")
    rng = random.Random(f"arithmetic-{seed}-{difficulty}-{index}")
    usable = [template for template, level in TEMPLATES if level <= difficulty
              and (not templates or template.__name__.lstrip("_") in templates)]
    if not usable:
        raise DataError(f"arithmetic templates {list(templates)} are not unlocked at difficulty {difficulty}: "
                        + ", ".join(f"{t.__name__.lstrip('_')} from {level}" for t, level in TEMPLATES))
    template = rng.choice(usable)
    text, answer = template(rng, MAGNITUDE[difficulty])
    family = "-" + "+".join(sorted(templates)) if templates else ""  # ids stay unique per selection
    return Task(task_id=f"arithmetic/d{difficulty}{family}-s{seed}-{index}", kind=MATH,
                task_type="arithmetic", prompt=text, answer=str(answer),
                metadata={"template": template.__name__.lstrip("_"),
                          "difficulty": str(difficulty)})


def arithmetic_tasks(count: int, seed: int = 0, difficulty: int = 2, templates: tuple[str, ...] = ()) -> list[Task]:
    if count <= 0:
        raise DataError(f"arithmetic task count must be positive, got {count}")
    return [arithmetic_task(seed, index, difficulty, tuple(templates)) for index in range(count)]


REASONING_GYM_DEFAULTS = ("gsm_symbolic", "basic_arithmetic", "simple_equations")


def reasoning_gym_tasks(name: str, count: int, seed: int = 0, **config) -> list[Task]:
    """count problems from reasoning-gym's generator `name` (task_type = name).

    Grading uses math-verify, so only generators whose answers are math expressions fit
    (the three in REASONING_GYM_DEFAULTS do).
    """
    try:
        import reasoning_gym
    except ImportError as err:
        raise DataError("reasoning-gym is not installed: `pip install reasoning-gym`") from err
    if count <= 0:
        raise DataError(f"reasoning-gym task count must be positive, got {count}")
    try:
        dataset = reasoning_gym.create_dataset(name, size=count, seed=seed, **config)
    except (KeyError, ValueError) as err:
        raise DataError(f"reasoning-gym cannot create dataset {name!r}: {err}") from err
    tasks = []
    for index, entry in enumerate(dataset):
        meta = entry.get("metadata", {})
        tasks.append(Task(task_id=f"{name}/s{seed}-{index}", kind=MATH, task_type=name,
                          prompt=entry["question"], answer=str(entry["answer"]),
                          metadata={"generator": "reasoning_gym",
                                    "difficulty": str(meta.get("difficulty", ""))}))
    return tasks
