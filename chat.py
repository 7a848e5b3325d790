"""Talk to a model fine-tuned on conversations, in the terminal, its answer printed as it is made.

    python chat.py --out_dir=out/chat                                      # a conversation
    python chat.py --out_dir=out/chat --prompt="What does json.dumps do?"  # one answer, for scripts
    python chat.py --out_dir=out/chat --system="You answer in one sentence." --temperature=0
    python chat.py --out_dir=out/chat --serve                              # OpenAI's API and a page, on :8000

Make such a model first (config/chat_demo.py): `python prepare.py --source=stdlib_chat
--tokenizer=data/python`, then `python train.py config/chat_demo.py --init_from=out/demo/best.pt`.
A model never fine-tuned on conversations is refused: it would continue the text, not answer.

The conversation is kept: each answer reads every earlier turn. The model reads at most
block_size tokens, so when the conversation with room for an answer outgrows them, the oldest
exchanges are dropped (a line says so; the system message stays). Type /reset to start over
and /quit (or Ctrl-D) to leave. The sampling flags are sample.py's; `--help` lists them all.

With --serve the model answers over HTTP instead, as OpenAI's chat-completions API does, at
http://127.0.0.1:8000/v1 for programs and / for a person in a browser (owngpt/serve.py); the
flags are the defaults of what a request leaves out.
"""
import sys

import torch

from owngpt import flags
from owngpt.chat import ChatError, chat_token_ids, fit_context, reply
from owngpt.inference import SAMPLING_CHECKS, load_trained
from owngpt.runtime import pick_device
from owngpt.serve import serve_model

_NAMES_BEFORE_DEFAULTS = set(globals())
# ----------------------------------------------------------------------------- defaults
out_dir = "out/chat"  # the folder train.py wrote while fine-tuning on conversations, or hf:FOLDER (export.py's)
ckpt = "best"  # best (best.pt, the lowest val loss) or latest (ckpt.pt)
prompt = ""  # one message: print the answer and exit (empty: a conversation in the terminal)
system = ""  # a system message that opens the conversation (empty: none)
max_new_tokens = 200  # an answer's tokens at most (it stops earlier at the model's end of turn)
temperature = 0.7  # 0 is greedy; below 1 sharper, above 1 more random
top_k = 50  # draw only from the k likeliest tokens; 0 for all
top_p = 1.0  # draw only from the smallest set of tokens whose probability reaches p; 1.0 for all
seed = 1337  # the same model, conversation, flags and seed give the same answers
device = "auto"  # auto (cuda, then mps, then cpu), or a torch device: cpu, cuda, cuda:1, mps
serve = False  # answer over HTTP (OpenAI's chat-completions API, and a chat page at /) instead of in the terminal
host = "127.0.0.1"  # serve: the address to listen on; 0.0.0.0 makes the model reachable from the network
port = 8000  # serve: the port to listen on (0: a free one, named in the start line)
# -----------------------------------------------------------------------------
DEFAULTS = {name: value for name, value in globals().items()
            if name not in _NAMES_BEFORE_DEFAULTS and not name.startswith("_")}
HELP = flags.comments_of(__file__)
CHECKS = {**SAMPLING_CHECKS, "port": flags.between(0, 65535)}
FINE_TUNE = ("python prepare.py --source=stdlib_chat --tokenizer=data/python && "
             "python train.py config/chat_demo.py --init_from=out/demo/best.pt")


class Chat:
    """A model that answers, and the conversation so far."""

    def __init__(self, settings):
        self.settings = settings
        device = pick_device(settings["device"])
        self.model, self.tokenizer, checkpoint = load_trained(settings["out_dir"], settings["ckpt"], device)
        if not checkpoint.get("chat"):  # train.py's on a chat dataset, or its export with the chat template
            raise ChatError(f"{settings['out_dir']} holds a model never fine-tuned on conversations: it continues "
                            f"text, it does not answer. Fine-tune one: {FINE_TUNE}")
        chat_token_ids(self.tokenizer)  # the chat tokens are there
        self.generator = torch.Generator(device=device).manual_seed(settings["seed"])
        self.messages = []
        self.reset()

    def reset(self):
        self.messages = [{"role": "system", "content": self.settings["system"]}] if self.settings["system"] else []

    def answer(self, text, write):
        """Add the user's message, write(piece of text) as the answer is made, keep the answer.
        Returns a note when the oldest exchanges were dropped to make room."""
        block_size = self.model.config.block_size
        self.messages, dropped, answer_tokens = fit_context(self.messages + [{"role": "user", "content": text}],
                                                           self.tokenizer, block_size, self.settings["max_new_tokens"])
        pieces = []
        for piece in reply(self.model, self.tokenizer, self.messages, answer_tokens, self.settings["temperature"],
                           self.settings["top_k"] or None, self.settings["top_p"], self.generator):
            write(piece.text)
            pieces.append(piece.text)
        self.messages.append({"role": "assistant", "content": "".join(pieces)})
        if dropped:
            return (f"[the conversation outgrew the model's {block_size} tokens: the oldest {dropped // 2} "
                    f"exchange{'s' if dropped > 2 else ''} dropped]")
        return None


def write_out(text):
    sys.stdout.write(text)
    sys.stdout.flush()


def converse(chat):
    """The terminal loop: a message a line; /reset, /quit."""
    print("chat with the model: /reset starts over, /quit (or Ctrl-D) leaves", file=sys.stderr)
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return
        if text == "/quit":
            return
        if text == "/reset":
            chat.reset()
            print("[a new conversation]", file=sys.stderr)
            continue
        if not text:
            continue
        write_out("model> ")
        note = chat.answer(text, write_out)
        write_out("\n")
        if note:
            print(note, file=sys.stderr)


def run(settings):
    chat = Chat(settings)
    if settings["serve"]:
        serve_model(settings["out_dir"], chat.model, chat.tokenizer, chat.generator, settings)
    elif settings["prompt"]:
        note = chat.answer(settings["prompt"], write_out)
        write_out("\n")
        if note:
            print(note, file=sys.stderr)
    else:
        converse(chat)


def main(argv):
    return flags.run_script(run, argv, DEFAULTS, HELP, CHECKS, program="chat.py")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
