"""Conversations about the Python standard library, made from its own source: an offline chat
dataset for a workshop room (`python prepare.py --source=stdlib_chat --tokenizer=data/python`).

    for function in stdlib_functions():          # every public function and method with a docstring
        messages = conversation(function)        # a question about it, answered from its source

Each public function of a module, and each public method of its public classes, whose docstring
opens with a paragraph of a sentence or a few, gets one conversation: "What does json.dumps
do?" answered by that paragraph, or "What arguments does shutil.copy take?" answered by its
signature, or both in turn; a question's words and a system message vary with a hash of the
function's name, so the dataset is the same on every run of the same Python. The source is read
with ast, never imported: nothing runs. A function's conversations share its name as their
group, so a held-out function (val) is one the fine-tuned model was never shown.
"""
import ast
import hashlib
from dataclasses import dataclass

from owngpt.sources import python_inputs

SYSTEM = "You answer questions about the Python standard library."
DOES = ("What does {name} do?", "What is {name} for?", "Explain {name}.", "Tell me what {name} does.")
TAKES = ("What arguments does {name} take?", "What is the signature of {name}?", "How do I call {name}?")
SHORTEST, LONGEST = 20, 400  # characters of the docstring's first paragraph that make an answer


@dataclass
class Function:
    name: str  # as it is called: json.dumps, pathlib.Path.read_text
    doc: str  # the docstring's first paragraph, on one line
    arguments: str  # the parameters as written in the source, self left out


def module_name(relative_path):
    """json/__init__.py -> json; email/utils.py -> email.utils."""
    parts = relative_path.removesuffix(".py").split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def first_paragraph(node):
    doc = ast.get_docstring(node)
    return " ".join(doc.split("\n\n")[0].split()) if doc else ""


def arguments_of(node):
    arguments = node.args
    if arguments.posonlyargs[:1] and arguments.posonlyargs[0].arg in ("self", "cls"):
        arguments.posonlyargs = arguments.posonlyargs[1:]
    elif arguments.args[:1] and arguments.args[0].arg in ("self", "cls"):
        arguments.args = arguments.args[1:]
    return ast.unparse(arguments)


def stdlib_functions():
    """Every public function and public class's public method with a usable first paragraph,
    in file order: the running Python's standard library, as --source=python reads it."""
    inputs, _ = python_inputs()
    functions, names = [], set()
    for input_file in inputs:
        if input_file.kind != "text":
            continue
        try:
            tree = ast.parse(input_file.path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):  # a file of another Python's syntax
            continue
        module = module_name(input_file.name)
        if any(part.startswith("_") for part in module.split(".")):
            continue  # a private module: not what people call
        for node in tree.body:
            members = [(node, module)]
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                members = [(member, f"{module}.{node.name}") for member in node.body]
            for member, owner in members:
                if not isinstance(member, (ast.FunctionDef, ast.AsyncFunctionDef)) or member.name.startswith("_"):
                    continue
                name, doc = f"{owner}.{member.name}", first_paragraph(member)
                if SHORTEST <= len(doc) <= LONGEST and name not in names:  # a name defined twice: its first
                    names.add(name)
                    functions.append(Function(name, doc, arguments_of(member)))
    return functions


def conversation(function):
    """The messages of function's conversation, chosen by a hash of its name."""
    roll = int.from_bytes(hashlib.sha256(function.name.encode()).digest()[:8], "big")
    does = {"role": "user", "content": DOES[roll % len(DOES)].format(name=function.name)}
    takes = {"role": "user", "content": TAKES[roll // 4 % len(TAKES)].format(name=function.name)}
    answers = {"does": {"role": "assistant", "content": function.doc},
               "takes": {"role": "assistant", "content": f"{function.name}({function.arguments})"}}
    kind = roll // 16 % 4  # two in four ask what it does, one its arguments, one both
    turns = ([does, answers["does"]] if kind < 2 else [takes, answers["takes"]] if kind == 2
             else [does, answers["does"], takes, answers["takes"]])
    system = [{"role": "system", "content": SYSTEM}] if roll // 64 % 4 == 0 else []
    return system + turns
