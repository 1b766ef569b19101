package forecast

import (
	"errors"
	"fmt"
	"math"
	"strings"

	"github.com/tallybilling/tally/internal/catalog"
)

// Suggestion is the credit pack, and how many of it, to buy so the balance
// covers the next SuggestionDays days at the pessimistic pace, at the
// lowest price.
type Suggestion struct {
	// Item is the pack's catalog id, Quantity how many to buy in one
	// checkout.
	Item     string
	Quantity int64
	// Amount is the price of them all, in minor units of Currency, and
	// Credits the credits they grant.
	Amount   int64
	Currency string
	Credits  int64
	// Covers reports whether Credits cover the need; false when no pack
	// does within one checkout's limits and this is the most one buys.
	Covers bool
	// CoversDays is the pessimistic runway of the balance after buying;
	// nil when it outlasts the forecast (forecast more days to know more).
	CoversDays *int
	// Reason says in words why this pack and quantity.
	Reason string
}

// CheckoutLimits are the bounds of one checkout that a suggestion must
// stay within, so it can be bought as suggested.
type CheckoutLimits struct {
	// MaxQuantity is the most units of a pack one checkout buys; 0 for
	// no bound but the catalog's.
	MaxQuantity int64
}

// ErrMixedCurrencies is returned by Suggest for packs priced in more than
// one currency: their prices cannot be compared. Pass the packs of the
// customer's currency.
var ErrMixedCurrencies = errors.New("credit packs in more than one currency")

// Suggest returns the pack and quantity that cover the pessimistic
// consumption of the next SuggestionDays days beyond available credits at
// the lowest total price, or nil when available covers them already (or
// there is no pack with credits to suggest).
//
// Among packs that cover the need, the lowest price wins, then the most
// credits for it, then the fewest units, then the catalog's order. When
// none covers it within one checkout (limits.MaxQuantity units, the
// largest grant catalog.MaxCreditsPerMove and the largest charge
// catalog.MaxChargeMinorUnits), the suggestion is the purchase of the
// most credits one checkout buys, with Covers false.
//
// Errors: ErrForecastTooShort when f covers fewer than SuggestionDays
// days; ErrMixedCurrencies.
func (f Forecast) Suggest(available float64, packs []catalog.CreditPack, limits CheckoutLimits) (*Suggestion, error) {
	need, err := f.Need(available, SuggestionDays)
	if err != nil {
		return nil, err
	}
	for _, p := range packs[min(1, len(packs)):] {
		if p.Currency != packs[0].Currency {
			return nil, fmt.Errorf("%w: %s and %s", ErrMixedCurrencies, packs[0].Currency, p.Currency)
		}
	}
	if need <= 0 {
		return nil, nil
	}
	// Credits are whole: a need of 4.2 credits takes 5. Beyond the
	// largest grant the exact number no longer matters.
	needed := int64(math.Ceil(min(need, catalog.MaxCreditsPerMove+1)))
	s := choosePack(packs, needed, limits)
	if s == nil {
		return nil, nil
	}
	s.CoversDays = f.Runway(available + float64(s.Credits)).PessimisticDays
	s.Reason = suggestionReason(*s, available, needed, f.Cumulative[SuggestionDays-1].High, len(f.Cumulative))
	return s, nil
}

// choosePack picks the pack and quantity for needed credits (see Suggest).
func choosePack(packs []catalog.CreditPack, needed int64, limits CheckoutLimits) *Suggestion {
	var best *Suggestion
	better := func(c Suggestion) bool {
		switch {
		case best == nil:
			return true
		case c.Covers != best.Covers:
			return c.Covers
		case !c.Covers && c.Credits != best.Credits:
			return c.Credits > best.Credits
		case c.Amount != best.Amount:
			return c.Amount < best.Amount
		case c.Credits != best.Credits:
			return c.Credits > best.Credits
		default:
			return c.Quantity < best.Quantity
		}
	}
	for _, p := range packs {
		if p.Credits <= 0 || p.Amount < 0 {
			continue
		}
		most := int64(catalog.MaxCreditsPerMove / p.Credits)
		if limits.MaxQuantity > 0 {
			most = min(most, limits.MaxQuantity)
		}
		if p.Amount > 0 {
			most = min(most, catalog.MaxChargeMinorUnits/p.Amount)
		}
		if most < 1 {
			continue
		}
		q := (needed + p.Credits - 1) / p.Credits
		c := Suggestion{Item: p.ID, Currency: p.Currency, Covers: q <= most}
		c.Quantity = min(q, most)
		c.Amount, c.Credits = c.Quantity*p.Amount, c.Quantity*p.Credits
		if better(c) {
			best = &c
		}
	}
	return best
}

func suggestionReason(s Suggestion, available float64, needed int64, pessimistic float64, forecastDays int) string {
	var b strings.Builder
	fmt.Fprintf(&b, "At the pessimistic pace (the 90%% bound), the next %d days consume about %.0f credits and %.0f are available, so %d more are needed. ",
		SuggestionDays, math.Ceil(pessimistic), math.Floor(max(available, 0)), needed)
	if s.Covers {
		fmt.Fprintf(&b, "%d × %s (%d credits) is the lowest price that covers them", s.Quantity, s.Item, s.Credits)
	} else {
		fmt.Fprintf(&b, "No pack covers that in one checkout; %d × %s (%d credits) is the most one checkout buys", s.Quantity, s.Item, s.Credits)
	}
	if s.CoversDays != nil {
		fmt.Fprintf(&b, ", and the balance then lasts %d days at that pace.", *s.CoversDays)
	} else {
		fmt.Fprintf(&b, ", and the balance then lasts beyond the %d days forecast at that pace.", forecastDays)
	}
	return b.String()
}
