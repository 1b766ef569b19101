package payments

import "strings"

// creationFailed begins the reason of a payment whose Checkout Session
// Stripe never created; what follows it is Stripe's own account of why
// (its request id, error code and message), written for the merchant.
const creationFailed = "checkout session creation failed"

// ForCustomer is p as its own end user may read it: the reasons keep what
// happened but lose the payment provider's internals (Stripe's request id,
// error codes, messages about the merchant's account), which the backend
// and operators read with their API keys.
func (p Payment) ForCustomer() Payment {
	p.FailureReason = customerReason(p.FailureReason)
	if p.Transitions != nil {
		ts := make([]Transition, len(p.Transitions))
		for i, t := range p.Transitions {
			t.Reason = customerReason(t.Reason)
			ts[i] = t
		}
		p.Transitions = ts
	}
	return p
}

func customerReason(reason string) string {
	for _, prefix := range []string{creationFailed, invoiceCreationFailed} {
		if strings.HasPrefix(reason, prefix) {
			return prefix
		}
	}
	return reason
}
