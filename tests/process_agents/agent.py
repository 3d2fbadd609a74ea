"""A Python agent in its own process: the OpenAI SDK against OPENAI_BASE_URL, the task on stdin.

Behaviours for the failure tests are chosen by the task's ``mode``.
"""
import json
import os
import sys
import time

import openai

task = json.loads(sys.stdin.read())
mode = task.get("mode", "ok")
if mode == "crash":
    print("something broke in the agent", file=sys.stderr)
    sys.exit(7)
if mode == "garbage":
    sys.stdout.write("\x00\xff not json {{{\n")  # ignored: stdout is the agent's own business
if mode == "silent":
    sys.exit(0)
client = openai.OpenAI(max_retries=0)  # OPENAI_BASE_URL / OPENAI_API_KEY from the environment
reply = client.chat.completions.create(model=os.environ["LL_MODEL"], max_tokens=3,
                                       messages=[{"role": "user", "content": task["q"]}])
if mode == "hang":
    time.sleep(3600)
if mode == "garbage":
    print(json.dumps({"reward": "lots"}))  # a reward line that is not a number: a failure
else:
    print(json.dumps({"reward": float(len(reply.choices[0].message.content))}))
