"""Write ``mobile_export/assets/text/calibration.txt``: the broad calibration text GPTQ/AWQ use by default.

Three kinds of text, so the calibrated integers do not specialise to one domain:

- prose: sections of the Python Language Reference as shipped in this Python's
  ``pydoc_data/topics.py`` (Python documentation, PSF License Version 2);
- code: two standard-library modules, ``textwrap.py`` and ``heapq.py`` (PSF License Version 2);
- dialogue: conversations written for this project (Apache-2.0), plain and in a chat layout.

None of it is the text builds evaluate on (``fixed_eval.txt``) or the code the benchmarks
evaluate on (``argparse.py``). Run: ``python tools/make_calibration_text.py``.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "mobile_export" / "assets" / "text" / "calibration.txt"
TOPICS = ("if", "while", "for", "try", "with", "function", "class", "exceptions", "naming", "lambda", "truth")
TOPIC_CHARS = 1500  # per topic
MODULES = ("textwrap.py", "heapq.py")
MODULE_CHARS = 6000  # per module

DIALOGUE = """\
"Are you coming to the market on Saturday?" asked Mira, leaning on the garden gate.
"Only if it stops raining," said Tomas. "Last week the stalls were half empty and the bread sold out by nine."
"Then we should go early. I want apples for the pie, and my grandmother asked for honey."
"Which honey? The dark one from the hills, or the clear one the beekeeper sells in little jars?"
"The dark one. She says the clear one tastes of nothing but sugar."
"Fair enough. I'll bring the bicycle with the big basket. Meet you at the bridge at half past seven?"
"Half past seven. Don't be late this time."
"I was late once!"
"Twice. But who's counting?"

Customer: Hello, my laptop will not turn on since yesterday. The light blinks orange three times.
Support: I'm sorry to hear that. Three orange blinks usually mean the battery is too low to start. Have you tried leaving it on the charger for an hour?
Customer: I left it overnight, but nothing changed.
Support: Thank you. Could you check whether the charger's own light is on when it is plugged into the wall?
Customer: There is no light at all on the charger.
Support: Then the charger is the most likely culprit, not the laptop. If you have another charger of the same power, please try it. Otherwise we can send a replacement; it takes two to three working days.
Customer: Please send one. Do you need my address again?
Support: No, I can see it on your order. You'll get an email with the tracking number this afternoon. Is there anything else I can help with?
Customer: No, that's all. Thanks for the quick answer.

Teacher: Who can tell me why the Moon shows phases?
Student: Because the Earth's shadow covers part of it?
Teacher: That's a common idea, but the Earth's shadow only falls on the Moon during an eclipse. Think about where the Sun is.
Student: Oh. The Sun always lights half of the Moon, and we see a different part of that lit half as the Moon goes around us.
Teacher: Exactly. And how long does one full cycle take?
Student: About twenty-nine and a half days.

<|im_start|>system
You are a helpful assistant.<|im_end|>
<|im_start|>user
How many minutes should I boil an egg if I want the yolk still soft?<|im_end|>
<|im_start|>assistant
For a soft, runny yolk, lower the egg into boiling water and cook it for about six minutes, then put it in cold water for a minute so it stops cooking. Seven minutes gives a yolk that is jammy but no longer liquid.<|im_end|>
<|im_start|>user
Write a Python function that returns the largest of three numbers.<|im_end|>
<|im_start|>assistant
Here is a simple version:

def largest(a, b, c):
    return max(a, b, c)

If you want to avoid the built-in, compare them step by step:

def largest(a, b, c):
    best = a
    if b > best:
        best = b
    if c > best:
        best = c
    return best<|im_end|>
<|im_start|>user
What is the difference between weather and climate?<|im_end|>
<|im_start|>assistant
Weather is what the atmosphere does over hours or days: today's rain, tomorrow's wind. Climate is the pattern of weather over many years in a place, such as how warm its summers usually are or how much rain falls in a typical year.<|im_end|>
<|im_start|>user
Translate "good morning, how are you?" into French and German.<|im_end|>
<|im_start|>assistant
French: « Bonjour, comment allez-vous ? » German: „Guten Morgen, wie geht es Ihnen?“<|im_end|>
"""


def _topics() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name][:TOPIC_CHARS].rsplit("\n", 1)[0] for name in TOPICS)


def _modules() -> str:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for name in MODULES:
        text = (stdlib / name).read_text(encoding="utf-8")
        parts.append(text[:MODULE_CHARS].rsplit("\n", 1)[0])
    return "\n\n".join(parts)


def main() -> None:
    text = "\n\n".join((DIALOGUE, _topics(), _modules())) + "\n"
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT} ({len(text)} characters)")


if __name__ == "__main__":
    main()
