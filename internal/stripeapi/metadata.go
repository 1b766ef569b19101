package stripeapi

// The metadata keys tally sets on the Stripe objects it creates, so that
// every object a webhook brings back can be traced to tally's records.
// They are stored at Stripe with every object: renaming one would orphan
// the objects created before.
const (
	// MetadataPaymentID names the tally payment, on a Checkout Session and
	// on its PaymentIntent or Subscription.
	MetadataPaymentID = "tally_payment_id"
	// MetadataCustomerID names the tally customer, on its Stripe Customer
	// and on a Checkout Session and its PaymentIntent or Subscription.
	MetadataCustomerID = "tally_customer_id"
	// MetadataItem names the catalog item a Checkout Session sells (set by
	// payments, carried to the Subscription of a plan).
	MetadataItem = "tally_item"
)
