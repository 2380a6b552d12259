/**
 * Where the worker's log lines go. Any object with these methods fits, `console` included;
 * a missing method drops that level.
 */
export interface Logger {
  debug?(message: string, meta?: Record<string, unknown>): void;
  info?(message: string, meta?: Record<string, unknown>): void;
  warn?(message: string, meta?: Record<string, unknown>): void;
  error?(message: string, meta?: Record<string, unknown>): void;
}

/**
 * The default: warnings and errors on the console, prefixed `keel:` so they can be told
 * from the application's own lines. Debug and info are dropped: a healthy worker is quiet.
 */
export function consoleLogger(): Logger {
  const line = (write: (...data: unknown[]) => void) => (message: string, meta?: Record<string, unknown>) => {
    if (meta === undefined) write(`keel: ${message}`);
    else write(`keel: ${message}`, meta);
  };
  return { warn: line(console.warn), error: line(console.error) };
}
