/**
 * lib/quote.ts: how anything from a message becomes shell text: one argument
 * quoted for a POSIX shell, and the command's size limit.
 *
 * Never lets a byte of an argument reach the shell unquoted.
 */

/** sshd passes the command to `sh -c` as one argument: stay under Linux's 128 KiB limit. */
export const MAX_COMMAND_BYTES = 100_000;

/** Quotes one argument for a POSIX shell: the shell receives exactly `arg`. */
export function shellQuote(arg: string): string {
  if (/^[A-Za-z0-9_@%+=:,./-]+$/.test(arg)) return arg;
  return `'${arg.replaceAll("'", `'\\''`)}'`;
}
