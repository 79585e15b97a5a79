/**
 * lib/dead_letters.ts: the dead-letter queue's records, read without
 * reserving them, requeued byte for byte, discarded or purged (for the page
 * and `deno task dlq`); and a message body with its secret parameters masked.
 *
 * It never runs a command; a record it cannot read is shown as it is.
 */

import { errorText, isRecord } from "./util.ts";
import { type Catalog } from "./catalog.ts";
import {
  IronMqClient,
  QueueError,
  ReplyTooLarge,
  type StoredMessage,
} from "./ironmq.ts";
import { Secrets } from "./log.ts";
import { parseJsonBody, QUEUE_NAME } from "./message.ts";

// Dead letters: the records the worker writes to TASK_DEAD_LETTER_QUEUE, read,
// requeued and removed (`deno task dlq`, the monitor's page)

export interface DeadLetter {
  /** The record's message id in the dead-letter queue. */
  id: string;
  /**
   * The record as parsed; undefined when the message is not a record (a
   * verbatim body message, or something else someone posted there).
   */
  record?: Record<string, unknown>;
  /** The raw message body of the record message. */
  raw: string;
}

/** A message id as IronMQ gives them; anything else names no message (and no other path). */
const MESSAGE_ID = /^[A-Za-z0-9_-]{1,100}$/;

/** The dead-letter queue's records: read without reserving, requeued, discarded, purged. */
export class DeadLetters {
  constructor(
    private readonly client: IronMqClient,
    readonly deadLetterQueue: string,
  ) {}

  /** Records without reserving them (IronMQ's peek), oldest first, at most n (<= 100). */
  async list(n = 100): Promise<DeadLetter[]> {
    let count = Math.max(1, Math.min(100, Math.floor(n)));
    for (;;) {
      try {
        const messages = await this.client.peek(this.deadLetterQueue, count);
        return messages.map(deadLetterOf);
      } catch (e) {
        if (isQueueMissing(e)) return [];
        // Many large bodies at once: fewer of them, oldest first still.
        if (!(e instanceof ReplyTooLarge) || count === 1) throw e;
        count = Math.ceil(count / 2);
      }
    }
  }

  async get(id: string): Promise<DeadLetter | undefined> {
    if (!MESSAGE_ID.test(id)) return undefined;
    try {
      return deadLetterOf(
        await this.client.getMessage(this.deadLetterQueue, id),
      );
    } catch (e) {
      if (e instanceof QueueError && e.status === 404) return undefined;
      throw e;
    }
  }

  /**
   * Posts the original body back to the record's queue, verbatim, then
   * deletes the record (and its body message); resolves to the new message
   * id. Posted first: a failure between the two leaves the record, so the
   * message may be requeued twice, never lost.
   */
  async requeue(id: string): Promise<string> {
    const { record } = await this.record(id);
    const queue = record.queue;
    if (typeof queue !== "string" || !QUEUE_NAME.test(queue)) {
      throw new Error(
        `record ${id} in ${this.deadLetterQueue} names no queue to requeue to (queue: ${
          JSON.stringify(queue) ?? "missing"
        }): post its body yourself, then discard it`,
      );
    }
    const body = await this.bodyOf(id, record);
    // The webhook takes the body as raw bytes (no escaping, so a body that
    // fitted the queue fits again); a body it cannot carry byte for byte (a
    // lone surrogate, a leading byte order mark) goes as JSON.
    const [newId] = body.isWellFormed() && !body.startsWith("\uFEFF")
      ? await this.client.postVerbatim(queue, body)
      : await this.client.post(queue, [body]);
    if (newId === undefined) {
      throw new QueueError(
        `posting record ${id}'s body to ${queue} gave no message id: look in ${queue} before trying again`,
        200,
        false,
      );
    }
    try {
      await this.remove(id, record);
    } catch (e) {
      throw new Error(
        `record ${id} was requeued to ${queue} as message ${newId}, but could not be removed from ${this.deadLetterQueue} (${
          errorText(e)
        }): discard it, or it may be requeued twice`,
      );
    }
    return newId;
  }

  /** Deletes the record (and its body message); any other message there, on its own. */
  async discard(id: string): Promise<void> {
    const letter = await this.get(id);
    if (letter === undefined) throw this.noSuch(id);
    await this.remove(id, letter.record);
  }

  /** Deletes every message in the dead-letter queue; resolves to how many were there. */
  async purge(): Promise<number> {
    let size: number;
    try {
      size = await this.client.queueSize(this.deadLetterQueue);
    } catch (e) {
      if (isQueueMissing(e)) return 0;
      throw e;
    }
    await this.client.clearQueue(this.deadLetterQueue);
    return size;
  }

  private async record(
    id: string,
  ): Promise<DeadLetter & { record: Record<string, unknown> }> {
    const letter = await this.get(id);
    if (letter === undefined) throw this.noSuch(id);
    const { record } = letter;
    if (record === undefined) {
      throw new Error(
        `message ${id} in ${this.deadLetterQueue} is not a dead-letter record (the body of a record too large for one message, or something posted there by hand): requeue the record that names it, or discard it`,
      );
    }
    return { ...letter, record };
  }

  /** The body to run again: in the record, or in the message it names. */
  private async bodyOf(
    id: string,
    record: Record<string, unknown>,
  ): Promise<string> {
    if (typeof record.body === "string") return record.body;
    const bodyId = record.body_message_id;
    if (typeof bodyId !== "string") {
      throw new Error(
        `record ${id} in ${this.deadLetterQueue} has neither a body nor a body_message_id: nothing to requeue; discard it`,
      );
    }
    const message = MESSAGE_ID.test(bodyId)
      ? await this.client.getMessage(this.deadLetterQueue, bodyId).catch(
        (e) => {
          if (e instanceof QueueError && e.status === 404) return undefined;
          throw e;
        },
      )
      : undefined;
    if (message === undefined) {
      throw new Error(
        `record ${id}'s body, message ${bodyId} in ${this.deadLetterQueue}, is gone: nothing requeued; discard the record`,
      );
    }
    return message.body;
  }

  /** The record first, then its body message: a failure between leaves a stray body, not a record without one. */
  private async remove(
    id: string,
    record: Record<string, unknown> | undefined,
  ): Promise<void> {
    await this.deleteIfThere(id);
    const bodyId = record?.body_message_id;
    if (typeof bodyId === "string" && MESSAGE_ID.test(bodyId)) {
      await this.deleteIfThere(bodyId);
    }
  }

  private async deleteIfThere(id: string): Promise<void> {
    try {
      await this.client.deleteMessage(this.deadLetterQueue, id);
    } catch (e) {
      // Gone already (another discard, a purge): the outcome asked for.
      if (!(e instanceof QueueError && e.status === 404)) throw e;
    }
  }

  private noSuch(id: string): Error {
    return new Error(
      `no message ${
        JSON.stringify(id)
      } in ${this.deadLetterQueue}: list the records to see their ids`,
    );
  }
}

function isQueueMissing(e: unknown): boolean {
  return e instanceof QueueError && e.status === 404;
}

/** A dead-letter message, its record parsed when it is one (it names its queue, id and time). */
function deadLetterOf(message: StoredMessage): DeadLetter {
  let parsed: unknown;
  try {
    parsed = JSON.parse(message.body);
  } catch {
    // a body message, or text someone posted
  }
  const isDeadLetterRecord = isRecord(parsed) &&
    typeof parsed.queue === "string" && typeof parsed.id === "string" &&
    typeof parsed.failed_at === "string";
  return {
    id: message.id,
    record: isDeadLetterRecord ? parsed as Record<string, unknown> : undefined,
    raw: message.body,
  };
}

/**
 * A body with its secret parameters masked: those of the task it names (the
 * default task for plain `{"args": [...]}`), found as planMessage finds them,
 * plus the worker's own secrets. A body that names no known task has every
 * value a secret parameter of any task could take masked; one that starts like
 * JSON but does not parse as an object is not shown at all when the catalog
 * has secret parameters: which part is secret cannot be told.
 */
export function maskedBody(
  body: string,
  catalog: Catalog | undefined,
  secrets: Secrets,
): string {
  const parsed = parseJsonBody(body);
  const tasks = [...catalog?.tasks.values() ?? []];
  if (
    parsed === undefined || !tasks.some((t) => t.params.some((p) => p.secret))
  ) {
    return secrets.mask(body);
  }
  if ("reason" in parsed) {
    return "[not shown: the body does not parse as a JSON object, and the catalog has secret parameters]";
  }
  const message = { ...parsed.object };
  const named = typeof message.task === "string"
    ? catalog?.tasks.get(message.task)
    : message.task === undefined && catalog?.defaultTask !== undefined
    ? catalog.tasks.get(catalog.defaultTask)
    : undefined;
  const candidates = named === undefined ? tasks : [named];
  const secretAt = (i: number) =>
    candidates.some((t) => t.params[i]?.secret === true);
  const secretNamed = (name: string) =>
    candidates.some((t) => t.params.some((p) => p.name === name && p.secret));
  const found: string[] = [];
  let redacted = 0;
  const redact = (value: unknown) => {
    redacted++;
    if (typeof value === "string") found.push(value);
    return "[redacted]";
  };
  const anySecret = candidates.some((t) => t.params.some((p) => p.secret));
  if (Array.isArray(message.args)) {
    message.args = message.args.map((v, i) => secretAt(i) ? redact(v) : v);
  } else if (message.args !== undefined && anySecret) {
    message.args = redact(message.args);
  }
  if (isRecord(message.kwargs)) {
    message.kwargs = Object.fromEntries(
      Object.entries(message.kwargs).map((
        [k, v],
      ) => [k, secretNamed(k) ? redact(v) : v]),
    );
  } else if (message.kwargs !== undefined && anySecret) {
    message.kwargs = redact(message.kwargs);
  }
  // Shown as parsed, not as sent: a secret escaped in the JSON text (or given
  // twice under one name) cannot slip past a search for its value.
  const shown = redacted === 0 ? body : JSON.stringify(message);
  return secrets.with(found).mask(shown);
}
