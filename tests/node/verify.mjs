// Verify one Standard Webhooks request with the npm `standardwebhooks` package, as a
// receiver written in JavaScript would: `new Webhook(secret).verify(body, headers)`.
// Input on stdin: {"secret", "body", "headers"}. Prints "ok" or the error, exit 0 or 1.
import { Webhook } from "standardwebhooks";

let input = "";
for await (const chunk of process.stdin) input += chunk;
const { secret, body, headers } = JSON.parse(input);
try {
  new Webhook(secret).verify(body, headers);
  console.log("ok");
} catch (error) {
  console.log(String(error && error.message ? error.message : error));
  process.exit(1);
}
