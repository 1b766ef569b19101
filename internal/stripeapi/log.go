package stripeapi

import (
	"context"
	"fmt"
	"log/slog"
)

// leveledLogger hands stripe-go's request log to slog. stripe-go logs every
// error answer at error level, but each one is also returned to the caller,
// who decides whether it matters (a duplicate meter event does not), so
// stripe-go's errors are logged at debug level and its retries at info.
type leveledLogger struct {
	l *slog.Logger
}

func (l leveledLogger) log(level slog.Level, format string, v ...any) {
	if !l.l.Enabled(context.Background(), level) {
		return
	}
	l.l.Log(context.Background(), level, fmt.Sprintf(format, v...), "component", "stripe-go")
}

func (l leveledLogger) Debugf(format string, v ...any) { l.log(slog.LevelDebug, format, v...) }
func (l leveledLogger) Infof(format string, v ...any)  { l.log(slog.LevelDebug, format, v...) }
func (l leveledLogger) Warnf(format string, v ...any)  { l.log(slog.LevelInfo, format, v...) }
func (l leveledLogger) Errorf(format string, v ...any) { l.log(slog.LevelDebug, format, v...) }
