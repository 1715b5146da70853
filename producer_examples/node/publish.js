// Publish one mail job from Node.js with amqplib: a confirm channel, a persistent message,
// the job id as messageId, and the x-delay header to send it later.
//
//   npm install && node publish.js someone@example.org "Subject" "Text" [delayMs]
//
// Reads MAILBUS_AMQP_URL and MAILBUS_PREFIX; prints the job id once RabbitMQ confirmed it.
"use strict";

const amqp = require("amqplib");
const crypto = require("crypto");

async function publish(url, exchange, job, delayMs) {
  const connection = await amqp.connect(url);
  try {
    const channel = await connection.createConfirmChannel();
    const headers = delayMs ? { "x-delay": delayMs } : {};
    channel.publish(exchange, "send", Buffer.from(JSON.stringify(job)), {
      contentType: "application/json",
      persistent: true,
      messageId: job.id, // publishing the same id twice sends one mail
      headers,
      mandatory: true,
    });
    await channel.waitForConfirms(); // throws if the broker refused the message
    await channel.close();
  } finally {
    await connection.close();
  }
  return job.id;
}

async function main() {
  const [to, subject = "Hello from Node.js", text = "Sent by producer_examples/node/publish.js", delay] =
    process.argv.slice(2);
  if (!to) {
    console.error("usage: node publish.js TO [SUBJECT] [TEXT] [DELAY_MS]");
    process.exit(2);
  }
  const url = process.env.MAILBUS_AMQP_URL || "amqp://guest:guest@127.0.0.1:5672/";
  const prefix = process.env.MAILBUS_PREFIX || "mailbus";
  const job = {
    id: crypto.randomUUID(),
    domain: "example.com",
    from: { email: "app@example.com", name: "Node app" },
    to: [to],
    subject,
    text,
  };
  console.log(await publish(url, prefix, job, delay ? Number(delay) : undefined));
}

main().catch((error) => {
  console.error(error.message);
  process.exit(1);
});
