// The official OpenAI JavaScript SDK against the gateway, unchanged: chat whole and
// streamed, completions, embeddings, models listed and retrieved, and a typed error for
// an unknown model.
import assert from "node:assert/strict";
import OpenAI from "openai";

const client = new OpenAI({ baseURL: process.env.GATEWAY + "/v1", apiKey: process.env.TOKEN ?? "unused" });
const msg = (text) => [{ role: "user", content: text }];

const answer = await client.chat.completions.create({ model: "demo", messages: msg("hello node sdk") });
assert.equal(answer.choices[0].message.content, "hello node sdk");

const chunks = [];
for await (const event of await client.chat.completions.create({ model: "demo", messages: msg("one two three"), stream: true })) {
  const text = event.choices[0]?.delta?.content;
  if (text) chunks.push(text);
}
assert.deepEqual(chunks, ["one", " two", " three"]);

const text = await client.completions.create({ model: "demo", prompt: "node  completes" });
assert.equal(text.choices[0].text, "node completes");
assert.equal(text.usage.completion_tokens, 2);

const vectors = await client.embeddings.create({ model: "demo", input: ["a", "b", "a"] });
assert.deepEqual(vectors.data.map((d) => d.embedding.length), [8, 8, 8]);
assert.deepEqual(vectors.data[0].embedding, vectors.data[2].embedding);
assert.notDeepEqual(vectors.data[0].embedding, vectors.data[1].embedding);

const slashed = "meta-llama/Llama-3.1-8B-Instruct";
assert.equal((await client.models.retrieve("demo")).id, "demo");
assert.equal((await client.models.retrieve(slashed)).id, slashed);
const viaSlash = await client.chat.completions.create({ model: slashed, messages: msg("slashed name") });
assert.equal(viaSlash.choices[0].message.content, "slashed name");

const models = await client.models.list();
assert.deepEqual(models.data.map((m) => m.id), ["demo", slashed]);

await assert.rejects(
  client.chat.completions.create({ model: "nope", messages: msg("x") }),
  (e) => e instanceof OpenAI.NotFoundError && e.status === 404,
);
console.log("node openai sdk: chat, completions, embeddings, models and errors ok");
