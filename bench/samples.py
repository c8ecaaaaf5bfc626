"""Sample exchanges from a checkpoint, printed as markdown, for docs/MODEL.md (pasted unedited).

    python -m bench.samples --checkpoint checkpoints/reformer-chat-small

Each exchange is a short conversation: the user lines below are fixed, the replies are whatever the model
generates with the service's default sampling settings and a fixed seed, through the same decode-state path
the service uses (one state per conversation, each turn feeds only the new tokens).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from model import SamplingParams, generate, load_checkpoint

CONVERSATIONS = [
    ["hi! how are you today?", "what are you doing this weekend?"],
    ["do you like music?", "who is your favorite band?"],
    ["i just got a new puppy", "she is a golden retriever. any name ideas?"],
    ["what's the best thing you ate this week?"],
    ["i have an exam tomorrow and i'm nervous", "thanks. how do you deal with stress?"],
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, default=Path("checkpoints/reformer-chat-small"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--repetition-penalty", type=float, default=1.1)
    parser.add_argument("--max-tokens", type=int, default=60)
    args = parser.parse_args()
    model, tokenizer = load_checkpoint(args.checkpoint, device="cpu")
    stop = (tokenizer.end_id, tokenizer.user_id, tokenizer.assistant_id, tokenizer.system_id)
    print(
        f"Sampling: temperature {args.temperature}, top-p {args.top_p}, top-k {args.top_k}, "
        f"repetition penalty {args.repetition_penalty}, at most {args.max_tokens} tokens per reply.\n"
    )
    with torch.inference_mode():
        for number, user_lines in enumerate(CONVERSATIONS, start=1):
            state = model.init_state(1)
            print(f"**Exchange {number}**\n")
            for turn, line in enumerate(user_lines):
                prompt = [*tokenizer.encode_turn("user", line), tokenizer.assistant_id]
                fed_before = int(state.length[0])
                params = SamplingParams(
                    temperature=args.temperature,
                    top_p=args.top_p,
                    top_k=args.top_k,
                    repetition_penalty=args.repetition_penalty,
                    max_tokens=args.max_tokens,
                    seed=args.seed + number * 10 + turn,
                    stop_token_ids=stop,
                )
                reply_ids = list(generate(model, state, prompt, params))
                # A reply cut at max_tokens leaves its last token unfed; the end-of-turn token closes the
                # reply in the state, as the service stores it.
                unfed = fed_before + len(prompt) + len(reply_ids) - int(state.length[0])
                tail = reply_ids[len(reply_ids) - unfed :] if unfed else []
                model.decode(torch.tensor([[*tail, tokenizer.end_id]]), state)
                reply = tokenizer.decode(reply_ids).replace("\n", "  \n> ")  # keep line breaks in the quote
                print(f"> **user:** {line}\n>\n> **assistant:** {reply}\n>")
            print()


if __name__ == "__main__":
    main()
