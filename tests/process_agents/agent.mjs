// A Node.js agent (no packages): one chat call per turn through the rollout's traced URL, then a
// reward (characters written / 10) POSTed to LL_REWARD_URL. Everything it needs arrives in the
// environment.
const base = process.env.OPENAI_BASE_URL;
const task = JSON.parse(process.env.LL_TASK);
const headers = {"Content-Type": "application/json",
                 "Authorization": `Bearer ${process.env.OPENAI_API_KEY}`};
let chars = 0;
for (let turn = 0; turn < task.turns; turn++) {
  const reply = await fetch(`${base}/chat/completions`, {
    method: "POST", headers,
    body: JSON.stringify({model: process.env.LL_MODEL, max_tokens: 4,
                          messages: [{role: "user", content: `${task.q} (turn ${turn})`}]}),
  });
  if (!reply.ok) { console.error(`HTTP ${reply.status}: ${await reply.text()}`); process.exit(3); }
  chars += (await reply.json()).choices[0].message.content.length;
}
await fetch(process.env.LL_REWARD_URL, {method: "POST", headers,
                                        body: JSON.stringify({reward: chars / 10, final: true})});
console.log(`node agent done: ${chars} characters`);
