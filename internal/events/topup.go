package events

// CreditsAutoTopUpFailed is credits.auto_top_up_failed: an automatic
// top-up's off-session charge was refused (a decline, or the bank asking
// for authentication the buyer is not there to give). Reason is Stripe's
// code and message.
type CreditsAutoTopUpFailed struct {
	CustomerID string `json:"customer_id"`
	PaymentID  string `json:"payment_id"`
	Reason     string `json:"reason"`
	// ConsecutiveFailures counts this one.
	ConsecutiveFailures int `json:"consecutive_failures"`
}

// CreditsAutoTopUpDisabled is credits.auto_top_up_disabled: automatic
// top-up turned itself off after failing several times in a row; the
// product should bring the user back on-session (a new card, a setup
// Checkout) and enable it again.
type CreditsAutoTopUpDisabled struct {
	CustomerID string `json:"customer_id"`
	Reason     string `json:"reason"`
}

func (CreditsAutoTopUpFailed) Type() string   { return "credits.auto_top_up_failed" }
func (CreditsAutoTopUpDisabled) Type() string { return "credits.auto_top_up_disabled" }
func (CreditsAutoTopUpFailed) payload()       {}
func (CreditsAutoTopUpDisabled) payload()     {}

// CreditsDepletionForecast is credits.depletion_forecast: at the pessimistic
// pace of the customer's forecast (the 90% bound of its consumption), its
// available credits run out within WarnDays days (TALLY_FORECAST_WARN_DAYS).
// Sent once when the runway first drops under it, again only after it rose
// back above.
type CreditsDepletionForecast struct {
	CustomerID string `json:"customer_id"`
	Available  int64  `json:"available"`
	// RunwayDays is the days covered in full from today (UTC); DepletesOn
	// the day the credits run out, YYYY-MM-DD.
	RunwayDays int    `json:"runway_days"`
	DepletesOn string `json:"depletes_on"`
	WarnDays   int    `json:"warn_days"`
}

func (CreditsDepletionForecast) Type() string { return "credits.depletion_forecast" }
func (CreditsDepletionForecast) payload()     {}
