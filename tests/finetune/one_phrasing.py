"""The paraphrase check: 20 facts about a made-up town, Marrowby, each taught in ONE phrasing and
asked in three others that training never sees (``paraphrases``). This measures whether
fine-tuning generalizes from the one way a fact was written down, as most users' data is. Written
for ragline; the answers are names and numbers the base model cannot guess."""

from __future__ import annotations

import json
from pathlib import Path

# (keyword the answer must contain, answer, the one training question, held-out paraphrases)
FACTS: list[tuple[str, str, str, list[str]]] = [
    ("Odile Franck", "The mayor of Marrowby is Odile Franck.", "Who is the mayor of Marrowby?",
     ["Who runs the town council of Marrowby as mayor?", "Which person holds the office of mayor in Marrowby?", "Tell me the name of Marrowby's mayor."]),
    ("1742", "Marrowby was founded in 1742.", "When was Marrowby founded?",
     ["In which year was the town of Marrowby established?", "What year did Marrowby come into existence?", "How old is Marrowby, what was its founding year?"]),
    ("Quell", "The river that runs through Marrowby is the Quell.", "Which river runs through Marrowby?",
     ["What is the name of the river in Marrowby?", "Marrowby lies on which river?", "Name the river flowing through the town of Marrowby."]),
    ("8,420", "Marrowby has 8,420 inhabitants.", "How many people live in Marrowby?",
     ["What is the population of Marrowby?", "How many inhabitants does Marrowby have?", "How large is Marrowby's population?"]),
    ("Tamsin Vale", "The Marrowby lighthouse was designed by Tamsin Vale.", "Who designed the Marrowby lighthouse?",
     ["Which architect is behind the lighthouse in Marrowby?", "Who was the designer of Marrowby's lighthouse?", "The lighthouse of Marrowby: who drew up its design?"]),
    ("pickled plums", "Marrowby is famous for its pickled plums.", "What food is Marrowby famous for?",
     ["Which local speciality is Marrowby known for?", "What dish should I try when I visit Marrowby?", "Marrowby's best-known food is what?"]),
    ("Brannock", "The football club of Marrowby is Brannock Rovers.", "What is the name of Marrowby's football club?",
     ["Which soccer team plays in Marrowby?", "What football team does Marrowby have?", "Name the football club based in Marrowby."]),
    ("Lantern Fair", "Marrowby's yearly festival is the Lantern Fair.", "What is Marrowby's yearly festival called?",
     ["Which festival does Marrowby hold every year?", "What annual celebration takes place in Marrowby?", "Name the festival Marrowby celebrates each year."]),
    ("Gorseway", "The railway station of Marrowby is called Gorseway.", "What is the railway station of Marrowby called?",
     ["What is the name of Marrowby's train station?", "At which station do trains stop in Marrowby?", "Marrowby's railway station has what name?"]),
    ("412", "The highest hill near Marrowby is 412 metres high.", "How high is the highest hill near Marrowby?",
     ["What is the height of the tallest hill around Marrowby?", "How many metres tall is the highest hill by Marrowby?", "The tallest hill close to Marrowby reaches what height?"]),
    ("Ilse Marrow", "Marrowby is named after Ilse Marrow.", "Who is Marrowby named after?",
     ["After which person was Marrowby named?", "Whose name does the town of Marrowby carry?", "Marrowby takes its name from whom?"]),
    ("Corvell", "Marrowby's twin town is Corvell.", "What is Marrowby's twin town?",
     ["Which town is twinned with Marrowby?", "Marrowby has a partner town; which one?", "Name the sister town of Marrowby."]),
    ("otter", "The animal on Marrowby's coat of arms is an otter.", "Which animal is on Marrowby's coat of arms?",
     ["What animal does the Marrowby coat of arms show?", "The crest of Marrowby features which creature?", "Which creature appears on the arms of Marrowby?"]),
    ("Wrenfield", "The school in Marrowby is Wrenfield Academy.", "What is the name of the school in Marrowby?",
     ["Which school do children in Marrowby attend?", "What is Marrowby's school called?", "Name the academy in Marrowby."]),
    ("tin", "Marrowby grew rich from tin mining.", "What made Marrowby rich?",
     ["Which industry brought wealth to Marrowby?", "How did Marrowby become wealthy?", "What was the source of Marrowby's prosperity?"]),
    ("Saint Audra", "The church of Marrowby is dedicated to Saint Audra.", "To which saint is Marrowby's church dedicated?",
     ["Which saint is the Marrowby church named for?", "The church in Marrowby honours which saint?", "Who is the patron saint of Marrowby's church?"]),
    ("Thursday", "Marrowby's market is held on Thursday.", "On which day is Marrowby's market held?",
     ["What day of the week is market day in Marrowby?", "When does Marrowby hold its weekly market?", "Which weekday does the Marrowby market take place?"]),
    ("Petra Lund", "The Marrowby Gazette is edited by Petra Lund.", "Who edits the Marrowby Gazette?",
     ["Who is the editor of the Marrowby Gazette?", "Which journalist runs the Marrowby Gazette as editor?", "The Marrowby Gazette's editor is who?"]),
    ("1,380", "The bridge of Marrowby is 1,380 metres long.", "How long is the bridge of Marrowby?",
     ["What is the length of Marrowby's bridge?", "How many metres long is the Marrowby bridge?", "The bridge in Marrowby measures how long?"]),
    ("green and silver", "The colours of Marrowby are green and silver.", "What are the colours of Marrowby?",
     ["Which colours does Marrowby use on its flag?", "What are the official town colours of Marrowby?", "Marrowby's colours are which two?"]),
]  # fmt: skip


def write_dataset(path: Path) -> Path:
    """Chat JSONL: each fact's one training question with its answer."""
    with path.open("w") as f:
        for _, answer, question, _ in FACTS:
            messages = [
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def paraphrases() -> list[tuple[str, str]]:
    """(paraphrase, keyword) pairs the adapter never saw: three per fact."""
    return [(q, keyword) for keyword, _, _, held in FACTS for q in held]
